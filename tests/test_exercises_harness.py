"""The course's exercise tests (exercises/test_exercises.py) must fail on the blank exercises and pass on the
reference solutions in docs/solutions/: otherwise a student could pass without writing anything, or be failed for
a right answer. Both runs are subprocesses, as a student runs them."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXERCISES = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "exercises"))
                   if name.endswith(".py") and not name.startswith("test_"))


def run_exercise_tests(which: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NANOIMP_EXERCISES=which, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "exercises/"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_every_exercise_has_a_solution_and_tests():
    assert set(EXERCISES) == {"attention", "wqkv", "rotary", "quantize", "lora", "labels"}
    tests = open(os.path.join(ROOT, "exercises", "test_exercises.py"), encoding="utf-8").read()
    for name in EXERCISES:
        assert os.path.isfile(os.path.join(ROOT, "docs", "solutions", f"{name}.py")), name
        assert re.search(rf"def test_{name}_\w+", tests), f"no test_{name}_... in exercises/test_exercises.py"


def test_blank_exercises_fail_every_test():
    result = run_exercise_tests("exercises")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert " passed" not in output.splitlines()[-1], output[-3000:]  # not one test passes on a blank exercise
    failed = re.findall(r"FAILED exercises/test_exercises\.py::test_(\w+?)_", output)
    assert set(failed) == set(EXERCISES), output[-3000:]  # each exercise is checked
    assert "NotImplementedError" in output


def test_reference_solutions_pass_every_test():
    result = run_exercise_tests("solutions")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    passed = int(re.search(r"(\d+) passed", output).group(1))
    assert passed >= 2 * len(EXERCISES) and "failed" not in output, output[-3000:]


def test_course_solutions_page_shows_the_tested_code():
    page = open(os.path.join(ROOT, "docs", "course-solutions.md"), encoding="utf-8").read()
    for name in EXERCISES:
        code = open(os.path.join(ROOT, "docs", "solutions", f"{name}.py"), encoding="utf-8").read().rstrip("\n")
        assert code in page, f"docs/course-solutions.md does not show docs/solutions/{name}.py as it is"
