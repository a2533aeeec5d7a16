"""README.md, run as a reader runs it: every code block marked <!-- README-test: NAME --> (the quick start, the
figures command and the course's experiments) is executed with bash, in a scratch copy of the repository and against the demo
model, so that the documentation cannot drift from the code. Nothing in the repository itself is touched.

The commands run as written, except for these shortenings (the same commands on less data, about two minutes in
all): shapes.py makes 40 training and 10 test images, training stops after 2 steps, evaluations look at 3
questions, and `pip install` lines are skipped (the tests run offline). Besides exit status 0, each block's
outcome is checked (CHECKS below). The data-path diagram is checked against the model configs as well.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DEMO = os.path.join(ROOT, "checkpoints", "demo")
BLOCK = re.compile(r"<!-- README-test: ([\w-]+) -->\n```bash\n(.*?)\n```", re.S)
SHORTER = [(r"--train \d+ --test \d+", "--train 40 --test 10"), (r"--max-steps \d+", "--max-steps 2"),
           (r"--limit \d+", "--limit 3")]
FAILS_ON_PURPOSE = {"exercise-rotary"}  # a command in it is meant to fail: run every line, check the output


def readme_blocks() -> dict:
    return dict(BLOCK.findall(open(README, encoding="utf-8").read()))


def shortened(commands: str) -> str:
    lines = [line for line in commands.splitlines() if not line.lstrip().startswith("pip ")]
    text = "\n".join(lines)
    for pattern, replacement in SHORTER:
        text = re.sub(pattern, replacement, text)
    return text


def run_block(workspace, name):
    options = [] if name in FAILS_ON_PURPOSE else ["-e", "-o", "pipefail"]
    env = {k: v for k, v in os.environ.items() if k != "IMP_MODEL"}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),  # `python` is this one
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(["bash", *options, "-c", shortened(readme_blocks()[name])], cwd=workspace, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README block {name!r} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the repository without its data and runs, with the exercises' data set made by the README."""
    if not os.path.isdir(DEMO):
        pytest.skip("checkpoints/demo is not there yet (train.py writes it)")
    folder = tmp_path_factory.mktemp("readme") / "nanoImp"
    shutil.copytree(ROOT, folder, ignore=shutil.ignore_patterns(".git", "data", "runs", "out", "__pycache__",
                                                                ".pytest_cache", "*.tmp*"))
    run_block(folder, "exercise-data")
    assert os.path.isfile(folder / "data" / "exercises" / "train.json")
    return folder


# -- what each block must show, besides exit status 0 -------------------------------------------------------------

def check_quick_start(workspace, result):
    assert result.stdout.strip()  # an answer
    assert "tiny demo model" in result.stderr


def check_figures(workspace, result):
    assert Image.open(workspace / "docs" / "attention-demo.png").format == "PNG"
    assert "data-path diagram" in result.stdout


def check_explain(workspace, result):
    for step in ("[image", "[resize", "[patches", "[ViT", "[connector", "[splice", "[decoder", "[tokens"):
        assert step in result.stderr
    assert result.stdout.strip()


def check_attention(workspace, result):
    for name, example in (("where-circle.png", "one_circle.png"), ("where-count.png", "three_squares.png")):
        assert Image.open(workspace / "runs" / name).size == Image.open(workspace / "examples" / example).size
    assert result.stderr.count("attention map: runs/where-") == 2


def check_rotary(workspace, result):
    output = result.stdout + result.stderr
    failed = set(re.findall(r"FAILED tests/test_imp\.py::(\w+)", output))
    assert {"test_phi2_matches_transformers", "test_imp_matches_reference_composition"} <= failed, output[-3000:]
    assert not any("siglip" in name or "kv_cache" in name for name in failed), output[-3000:]
    assert re.search(r"\d+ failed, \d+ passed", output)  # the KV-cache tests compare us with ourselves: they pass
    assert open(workspace / "imp.py").read() == open(os.path.join(ROOT, "imp.py")).read()  # mended again


def check_lora(workspace, result):
    trained = [float(number) for number in re.findall(r"([\d.]+)M of [\d.]+M parameters trained", result.stdout)]
    assert len(trained) == 3 and trained[0] < trained[1] < trained[2]  # ranks 1, 8, 64
    records = json.load(open(workspace / "data" / "left-right" / "train.json"))
    assert records and all(record["type"] == "position" and len(record["conversations"]) == 2 for record in records)
    for rank in (1, 8, 64):
        assert Image.open(workspace / "runs" / f"lora-r{rank}" / "loss.png").size == (900, 620)
        assert re.search(rf"rank +{rank}: mean loss of the first 50 steps [\d.]+, of the last 25 [\d.]+", result.stdout)
    assert len(re.findall(r"^overall +\d+ +\d+ +[\d.]+%$", result.stdout, re.M)) == 3  # each rank evaluated


def check_resolution(workspace, result):
    assert "196 px: 196 image tokens" in result.stdout and "384 px: 729 image tokens" in result.stdout
    assert "refused, exit code 2" in result.stdout and "trained at" in result.stderr


def check_int4(workspace, result):
    summaries = [line for line in result.stdout.splitlines() if " KL " in line]
    assert [re.search(r"G=(\d+)", line).group(1) for line in summaries] == ["32", "64", "128"]


CHECKS = {"quick-start": check_quick_start, "figures": check_figures, "exercise-explain": check_explain,
          "exercise-attention": check_attention, "exercise-rotary": check_rotary, "exercise-lora": check_lora,
          "exercise-resolution": check_resolution, "exercise-int4": check_int4}


def test_every_marked_block_is_checked():
    assert set(readme_blocks()) == set(CHECKS) | {"exercise-data"}


@pytest.mark.parametrize("name", list(CHECKS))
def test_readme_block_runs(workspace, name):
    CHECKS[name](workspace, run_block(workspace, name))


def test_readme_diagram_matches_the_models():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import make_figures
    finally:
        sys.path.pop(0)
    if not os.path.isdir(DEMO):
        pytest.skip("checkpoints/demo is not there yet")
    text = open(README, encoding="utf-8").read()
    written = text.split(make_figures.DIAGRAM_BEGIN + "\n")[1].split("\n" + make_figures.DIAGRAM_END)[0]
    assert written == make_figures.readme_diagram(DEMO), "run python tools/make_figures.py to update README.md"


def test_readme_pictures_exist():
    pictures = re.findall(r"(?:\]\(|src=\")(docs/[\w.-]+\.png)", open(README, encoding="utf-8").read())
    assert len(pictures) >= 7  # the four diagrams, the heat map, the two loss curves
    for picture in pictures:
        assert Image.open(os.path.join(ROOT, picture)).format == "PNG", picture
