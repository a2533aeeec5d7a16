"""Bad input, across the programs: every case is one line on stderr, exit code 2, no traceback, and no input file
lost or changed (each input folder or file is hashed before and after).

Everything runs in this process through the programs' main(argv) (an interpreter start costs seconds here), on
checkpoints/demo (copied where a case damages it) and, for train.py, on the "tiny" config and a 24-image shapes set.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import bench
import imp
import infer
import quant
import serve
import train

DEEP = "[" * 5000  # deeper than the json module's recursion allows
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "demo")


# -- helpers -----------------------------------------------------------------------------------------------------


def digest(*paths) -> str:
    """Names and bytes of every file under the given files / folders (symbolic links by their target text)."""
    hasher = hashlib.sha256()
    for top in paths:
        top = str(top)
        walk = [(top, [], [""])] if not os.path.isdir(top) or os.path.islink(top) else os.walk(top)
        for folder, _, names in sorted(walk):
            for name in sorted(names):
                path = os.path.join(folder, name) if name else folder
                hasher.update(path.encode("utf-8", "surrogateescape"))
                if os.path.islink(path):
                    hasher.update(os.readlink(path).encode("utf-8", "surrogateescape"))
                elif os.path.isfile(path):
                    hasher.update(open(path, "rb").read())
    return hasher.hexdigest()


def call(main, argv, stdin=None) -> tuple:
    """main(argv) in this process -> (exit code, stdout, stderr). An uncaught exception fails the test as it is."""
    out, err = io.StringIO(), io.StringIO()
    code = None
    saved_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.stdin = saved_stdin
    return (code if isinstance(code, int) else 0), out.getvalue(), err.getvalue()  # train.main returns the model


def refused(main, argv, *inputs, expected="", stdin=None) -> str:
    """The case's contract: exit 2, one line on stderr (containing `expected`), no traceback, inputs unchanged."""
    before = digest(*inputs)
    code, _, err = call(main, argv, stdin)
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and expected in err, err
    assert digest(*inputs) == before
    return err


def dead_pid() -> int:
    """The id of a process that has ended (reaped), for a temporary 'left by a killed run'."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A copy of the demo folder that cases copy again before damaging it."""
    folder = tmp_path_factory.mktemp("demo") / "demo"
    shutil.copytree(DEMO, folder)
    return folder


@pytest.fixture
def damaged(model, tmp_path):
    """-> a function(change) that copies the demo folder and applies change(folder) to the copy."""
    def make(change):
        folder = tmp_path / "model"
        shutil.copytree(model, folder)
        change(folder)
        return folder
    return make


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "red.png"
    from PIL import Image
    Image.new("RGB", (56, 56), (200, 30, 30)).save(path)
    return path


def scratch_args(data, out, *extra):
    """train.py, stage 2 from scratch on the tiny config (as tests/test_train.py)."""
    return ["--stage", 2, "--full", "--init-config", "tiny", "--tokenizer", data, "--data", data / "train.json",
            "--image-folder", data, "--out", out, "--batch-size", 8, "--micro-batch-size", 8, "--max-length", 256,
            "--threads", 1, *extra]


def edit_config(**changes):
    """-> change(folder) that sets config.json keys (a dotted key reaches into vision_tower_config)."""
    def change(folder):
        config = json.load(open(folder / "config.json"))
        for key, value in changes.items():
            target = config["vision_tower_config"] if key.startswith("vision_") else config
            target[key.removeprefix("vision_")] = value
        (folder / "config.json").write_text(json.dumps(config))
    return change


def write(name, content):
    """-> change(folder) that writes `content` (bytes or str) to folder/name, replacing whatever is there."""
    def change(folder):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return change


def config_is_a_folder(folder):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def config_symlink_loop(folder):
    (folder / "config.json").unlink()
    os.symlink("config.json", folder / "config.json")


def index(content):
    """A model.safetensors.index.json (the single model.safetensors stays: the index wins when present)."""
    return write("model.safetensors.index.json", content)


# -- bad model folders: infer.py, bench.py, serve.py and quant.py all name the right file --------------------------

BAD_FOLDERS = {
    "config.json is a folder": (config_is_a_folder, "config.json"),
    "config.json is a symlink loop": (config_symlink_loop, "config.json"),
    "config.json is not UTF-8": (write("config.json", b'{"model_type": "imp\xff\xfe"}'), "config.json"),
    "config.json is a list": (write("config.json", "[1, 2]"), "config.json"),
    "config.json is nested too deeply": (write("config.json", "[" * 5000 + "]" * 5000), "config.json"),
    "zero attention heads": (edit_config(num_attention_heads=0), "config.json"),
    "heads do not divide the width": (edit_config(num_attention_heads=3), "num_attention_heads"),
    "zero vision heads": (edit_config(vision_num_attention_heads=0), "config.json"),
    "vision heads do not divide": (edit_config(vision_num_attention_heads=5), "num_attention_heads"),
    "negative layer count": (edit_config(num_hidden_layers=-1), "num_hidden_layers must be an integer"),
    "negative width": (edit_config(hidden_size=-128), "config.json"),
    "a width that is text": (edit_config(hidden_size="128"), "config.json"),
    "int3 quantization": (edit_config(quantization=dict(quant.quantization_config(), bits=3)), "bits"),
    "quantization bits as text": (edit_config(quantization=dict(quant.quantization_config(), bits="4")), "bits"),
    "index is not JSON": (index("{"), "model.safetensors.index.json"),
    "index weight_map is a list": (index('{"weight_map": []}'), "model.safetensors.index.json"),
    "index names a number": (index('{"weight_map": {"a": 7}}'), "model.safetensors.index.json"),
    "index leaves the folder": (index('{"weight_map": {"a": "../model.safetensors"}}'), "model.safetensors.index.json"),
    "index is not UTF-8": (index(b'{"weight_map": {"a": "\xff"}}'), "model.safetensors.index.json"),
    "tokenizer.json is garbage": (write("tokenizer.json", b"\x00\xff garbage"), "tokenizer"),
    "tokenizer.json is not UTF-8": (write("tokenizer.json", b'{"version": "\xff"}'), "tokenizer"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_infer_bad_model_folder(case, damaged):
    change, expected = BAD_FOLDERS[case]
    folder = damaged(change)
    err = refused(infer.main, ["--model", folder, "--text", "hi"], folder, expected=expected)
    if "index" in case:
        assert "config.json" not in err  # the index is to blame, not config.json


@pytest.mark.parametrize("case", [c for c in BAD_FOLDERS if "tokenizer" not in c])  # bench runs without one
def test_bench_bad_model_folder(case, damaged):
    change, expected = BAD_FOLDERS[case]
    folder = damaged(change)
    refused(bench.main, ["--model", folder, "--dtypes", "float32"], folder, expected=expected)


@pytest.mark.parametrize("case", ["config.json is a folder", "zero attention heads", "index weight_map is a list",
                                  "int3 quantization", "tokenizer.json is garbage"])
def test_serve_bad_model_folder(case, damaged):
    change, expected = BAD_FOLDERS[case]
    folder = damaged(change)
    refused(serve.main, ["--model", folder, "--port", 0], folder, expected=expected)


@pytest.mark.parametrize("case", ["config.json is a folder", "config.json is a symlink loop", "zero attention heads",
                                  "heads do not divide the width", "index weight_map is a list",
                                  "index leaves the folder"])
def test_quant_bad_model_folder(case, damaged, tmp_path):
    change, expected = BAD_FOLDERS[case]
    folder = damaged(change)
    refused(quant.main, ["--model", folder, "--out", tmp_path / "q"], folder, expected=expected)
    assert not (tmp_path / "q" / "config.json").exists()


# -- infer.py: questions, settings, batch files ----------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["--text", "caf\udcff"], "not valid UTF-8"),                         # argv bytes that are not UTF-8
    (["IMAGE", "what is \udcc3\udca9?"], "not valid UTF-8"),
    (["no\0such.png", "what?"], "no such file"),                          # a NUL in an image path
    (["--text", "hi", "--temperature", "inf"], "temperature must be a finite number"),
    (["--text", "hi", "--temperature", "nan"], "temperature"),
    (["--text", "hi", "--top-p", "nan"], "top_p"),
    (["--text", "hi", "--seed", str(2**64)], "seed must be in 0 .. 2**64 - 1"),
    (["--text", "hi", "--seed", "-1"], "seed must be in 0 .. 2**64 - 1"),
    (["--text", "hi", "--max-new-tokens", str(10**30)], "max_new_tokens is too large"),
    (["--text", "hi", "--top-k", str(-10**30)], "top_k is too large"),
])
def test_infer_bad_arguments(argv, expected, model, image):
    argv = [str(image) if a == "IMAGE" else a for a in argv]
    refused(infer.main, ["--model", model, *argv], model, image, expected=expected)


def test_tiny_temperature_samples_as_greedy(model):
    """1e-45 makes logits / T overflow to inf (NaN probabilities): its limit, greedy, is what comes out."""
    code, tiny, err = call(infer.main, ["--model", model, "--text", "what shapes are there?", "--max-new-tokens", 6,
                                        "--temperature", 1e-45, "--seed", 1])
    assert code == 0, err
    assert tiny == call(infer.main, ["--model", model, "--text", "what shapes are there?", "--max-new-tokens", 6])[1]


BAD_LINES = {  # one bad line among good ones; the model folder does not exist, so the line must be checked first
    "max_new_tokens Infinity": ('{"question_id": 2, "text": "q", "max_new_tokens": Infinity}', "max_new_tokens"),
    "max_new_tokens NaN": ('{"question_id": 2, "text": "q", "max_new_tokens": NaN}', "max_new_tokens"),
    "max_new_tokens 1e30": ('{"question_id": 2, "text": "q", "max_new_tokens": 1e30}', "max_new_tokens"),
    "temperature Infinity": ('{"question_id": 2, "text": "q", "temperature": Infinity}', "temperature"),
    "temperature -Infinity": ('{"question_id": 2, "text": "q", "temperature": -Infinity}', "temperature"),
    "top_p NaN": ('{"question_id": 2, "text": "q", "top_p": NaN}', "top_p"),
    "top_k 1e30": ('{"question_id": 2, "text": "q", "top_k": 1e30}', "top_k"),
    "top_k -Infinity": ('{"question_id": 2, "text": "q", "top_k": -Infinity}', "top_k"),
    "seed 1e30": ('{"question_id": 2, "text": "q", "seed": 1e30}', "seed"),
    "seed NaN": ('{"question_id": 2, "text": "q", "seed": NaN}', "seed"),
    "seed 2**64": ('{"question_id": 2, "text": "q", "seed": 18446744073709551616}', "seed"),
    "negative seed": ('{"question_id": 2, "text": "q", "seed": -5}', "seed"),
    "lone surrogate in the text": ('{"question_id": 2, "text": "caf\\udcff"}', "UTF-8"),
    "NUL in the image path": ('{"question_id": 2, "text": "q", "image": "a\\u0000.png"}', "NUL"),
    "nested too deeply": (DEEP, "line 2"),
    "not UTF-8": (b'{"question_id": 2, "text": "caf\xe9"}', "cannot read"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_infer_batch_line_checked_before_the_model_loads(case, tmp_path):
    line, expected = BAD_LINES[case]
    line = line if isinstance(line, bytes) else line.encode()
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b'{"question_id": 1, "text": "fine"}\n' + line + b"\n")
    refused(infer.main, ["--model", tmp_path / "no-model", "--batch", questions, "--out", tmp_path / "a.jsonl"],
            questions, expected=expected)
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.parametrize("how", ["same path", "another spelling", "symbolic link", "hard link"])
def test_infer_batch_out_is_the_questions_file(how, tmp_path, model):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "text": "what shapes?"}\n')
    out = {"same path": questions, "another spelling": tmp_path / "." / ".." / tmp_path.name / "q.jsonl",
           "symbolic link": tmp_path / "link.jsonl", "hard link": tmp_path / "hard.jsonl"}[how]
    if how == "symbolic link":
        os.symlink(questions, out)
    if how == "hard link":
        os.link(questions, out)
    refused(infer.main, ["--model", model, "--batch", questions, "--out", out], tmp_path,
            expected="is the --batch file itself")


def test_infer_batch_out_is_a_folder(tmp_path, model):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "text": "what shapes?"}\n')
    (tmp_path / "answers").mkdir()
    refused(infer.main, ["--model", model, "--batch", questions, "--out", tmp_path / "answers"], tmp_path,
            expected="cannot open for writing")


def test_chat_line_that_is_not_utf8_is_one_error_and_the_chat_goes_on(model):
    code, out, err = call(infer.main, ["--model", model, "--chat", "--max-new-tokens", 4],
                          stdin=b"caf\xe9 au lait?\nwhat shapes?\n")
    assert code == 0, err
    assert err.count("\n") == 1 and "not valid UTF-8" in err and "Traceback" not in err
    assert out.strip()  # the second question was answered


# -- quant.py -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    pytest.param(b'[{"conversations": [{"from": "human", "value": "caf\xe9"}]}]', "cannot read it as JSON",
                 id="not UTF-8"),
    pytest.param('{"not": "a list"}', "record 0", id="not a list"),
    pytest.param('[{"conversations": []}]', "record 0", id="no turns"),
    pytest.param('[{"conversations": [{"value": "q"}], "image": "../../etc/passwd"}]', "leads outside",
                 id="image outside the folder"),
    pytest.param('[{"conversations": [{"value": "q"}], "image": "a\\u0000b.png"}]', "record 0", id="NUL in path"),
    pytest.param('[{"conversations": [{"value": "caf\\udcff"}]}]', "record 0", id="lone surrogate"),
    pytest.param(DEEP, "cannot read it as JSON", id="nested too deeply"),
])
def test_quant_eval_bad_data(content, expected, tmp_path, model):
    path = tmp_path / "data.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(quant.main, ["--eval", "--model", model, "--data", path], tmp_path, model, expected=expected)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (the demo's weights are 6 MB): writes there end in a real ENOSPC."""
    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (and a kernel that allows it here)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_quant_full_disk_is_one_line_and_leaves_no_temporary(small_disk, model):
    out = small_disk / "q"
    refused(quant.main, ["--model", model, "--bits", 8, "--out", out], model, expected="No space left on device")
    assert [name for name in os.listdir(out) if ".tmp" in name] == []  # the half-written shard was removed


# -- train.py -----------------------------------------------------------------------------------------------------


def records_file(tmp_path, content):
    path = tmp_path / "records.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD_TURNS = '[{"from": "human", "value": "<image>\\nwhat?"}, {"from": "gpt", "value": "a red square"}]'


@pytest.mark.parametrize("content, expected", [
    pytest.param(b'[{"conversations": [{"from": "human", "value": "caf\xe9"}]}]', "not a readable JSON text file",
                 id="not UTF-8"),
    pytest.param('[{"image": "a\\u0000b.png", "conversations": ' + GOOD_TURNS + '}]', "NUL", id="NUL in path"),
    pytest.param('[{"conversations": [{"from": "human", "value": "caf\\udcff"}, {"from": "gpt", "value": "x"}]}]',
                 "UTF-8", id="lone surrogate"),
    pytest.param(DEEP, "nested too deeply", id="nested too deeply"),
    ('{"conversations": []}', "'conversations' must be a non-empty list"),
    ('{"a": 1}', "no 'conversations'"),
    ('"just a string"', "a record must be a JSON object"),
])
def test_train_bad_records(content, expected, data, tmp_path):
    path = records_file(tmp_path, content)
    argv = scratch_args(data, tmp_path / "run", "--max-steps", 1)
    argv[argv.index("--data") + 1] = path
    refused(train.main, argv, path, data, expected=expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--seed", -1], "--seed must be in 0 .. 2**32 - 1"),
    (["--seed", 2**64], "--seed must be in 0 .. 2**32 - 1"),
    (["--out", "FILE"], "exists and is not a folder"),
    (["--batch-size", 0], "--batch-size must be at least 1"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_train_bad_arguments(extra, expected, data, tmp_path):
    (tmp_path / "file").write_text("keep me")
    argv = scratch_args(data, tmp_path / "run", "--max-steps", 1) + [tmp_path / "file" if a == "FILE" else a
                                                                      for a in extra]
    refused(train.main, argv, data, tmp_path, expected=expected)


@pytest.mark.parametrize("make, expected", [
    (lambda folder: None, "no such folder"),
    (lambda folder: (folder.mkdir(), (folder / "adapter_config.json").write_text("[]")), "expected a JSON object"),
    (lambda folder: (folder.mkdir(), (folder / "adapter_config.json").write_text('{"rank": 0, "alpha": 1}')),
     "positive integer rank"),
    (lambda folder: (folder.mkdir(), (folder / "adapter_config.json").write_text('{"rank": 4, "alpha": 8}'),
                     (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 20)), "not a readable safetensors"),
], ids=["no folder", "config not an object", "rank 0", "damaged safetensors"])
def test_train_merge_bad_adapters(make, expected, model, tmp_path):
    adapters = tmp_path / "adapters"
    make(adapters)
    refused(train.main, ["--merge", adapters, "--model", model, "--out", tmp_path / "merged"], model, tmp_path,
            expected=expected)
    assert not (tmp_path / "merged").exists()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A run of 2 steps with a checkpoint, to resume from."""
    out = tmp_path_factory.mktemp("run") / "run"
    code, _, err = call(train.main, scratch_args(data, out, "--max-steps", 2, "--save-every", 1))
    assert code == 0 and os.path.exists(out / "checkpoints" / "latest.json"), err
    return out


class NotWeights:
    """A pickled object of a class: torch.load(weights_only=True) must refuse it, never construct it."""


def not_weights_only(run):
    torch.save(dict(optimizer=NotWeights(), rng=[]), run / "checkpoints" / "step-0000002" / "state.pt")


RESUME_CASES = {
    "latest.json is not JSON": (lambda run: (run / "checkpoints" / "latest.json").write_text("{"), "not valid JSON"),
    "latest.json is not UTF-8": (lambda run: (run / "checkpoints" / "latest.json").write_bytes(b'{"\xff": 1}'),
                                 "not valid JSON"),
    "latest.json names nothing": (lambda run: (run / "checkpoints" / "latest.json").write_text(
        '{"step": 9, "folder": "step-0000009"}'), "which is not in"),
    "latest.json leaves its folder": (lambda run: (run / "checkpoints" / "latest.json").write_text(
        '{"step": 2, "folder": "../../etc"}'), "expected"),
    "latest.json is a dangling link": (lambda run: ((run / "checkpoints" / "latest.json").unlink(), os.symlink(
        "nowhere.json", run / "checkpoints" / "latest.json")), "no latest.json"),
    "state.pt is not weights only": (not_weights_only, "state.pt: not a checkpoint state"),
    "state.pt is truncated": (lambda run: (run / "checkpoints" / "step-0000002" / "state.pt").write_bytes(b"PK\x03"),
                              "state.pt: not a checkpoint state"),
    "meta.json is damaged": (lambda run: (run / "checkpoints" / "step-0000002" / "meta.json").write_text("[1"),
                             "meta.json"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_train_resume_from_a_damaged_checkpoint(case, trained, data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    damage, expected = RESUME_CASES[case]
    damage(run)
    constructed = []
    monkeypatch.setattr(NotWeights, "__setstate__", lambda self, state: constructed.append(state), raising=False)
    refused(train.main, scratch_args(data, run, "--max-steps", 2, "--save-every", 1, "--resume"), run, data,
            expected=expected)
    assert not constructed


def test_train_full_disk_during_torch_save_is_one_line(data, tmp_path, small_disk):
    """A real ENOSPC inside torch.save (state.pt, after trainable.safetensors fitted): one line, exit 2, and no
    temporary checkpoint folder left on the disk. Real, because torch.save reports a full disk as a RuntimeError
    ("unexpected pos"), which a patched write() does not reproduce (its OSError comes through as it is)."""
    out = small_disk / "run"
    err = refused(train.main, scratch_args(data, out, "--max-steps", 1, "--save-every", 1),
                  data, expected="out of disk space")
    assert "state.pt" in err  # trainable.safetensors fitted; torch.save hit the full disk
    assert [n for n in os.listdir(out / "checkpoints") if ".tmp" in n] == []


# -- bench.py and serve.py: the arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("main, argv, expected", [
    (bench.main, ["--threads", 0], "at least 1"),
    (bench.main, ["--no-such-option"], "unrecognized arguments"),
    (bench.main, ["--model", "MISSING"], "no such model folder"),
    (bench.main, ["--quick", "--json", "FOLDER"], "must be a file in an existing folder"),
    (bench.main, ["--quick", "--json", "MISSING/results.json"], "must be a file in an existing folder"),
    (bench.main, ["--quick", "--llama-cpp", "NOT_UTF8"], "--llama-cpp"),
    (bench.main, ["--quick", "--llama-cpp", "DEEP"], "--llama-cpp"),
    (bench.main, ["--quick", "--llama-cpp", "DICT"], "--llama-cpp"),
    (serve.main, ["--port", 70000], "--port"),
    (serve.main, ["--timeout", "nan"], "--timeout"),
    (serve.main, ["--queue", 0], "--queue"),
    (serve.main, ["--model", "MISSING"], "no such model folder"),
])
def test_bench_and_serve_bad_arguments(main, argv, expected, tmp_path):
    (tmp_path / "FOLDER").mkdir()
    (tmp_path / "NOT_UTF8").write_bytes(b'[{"format": "\xff"}]')
    (tmp_path / "DEEP").write_text(DEEP)
    (tmp_path / "DICT").write_text('{"format": "Q4_0"}')
    argv = [str(tmp_path / a) if str(a).split("/")[0] in ("FOLDER", "MISSING", "NOT_UTF8", "DEEP", "DICT") else a
            for a in argv]
    refused(main, argv, tmp_path, expected=expected)


@pytest.mark.parametrize("main, prog", [(infer.main, "infer.py"), (train.main, "train.py"), (quant.main, "quant.py"),
                                        (bench.main, "bench.py"), (serve.main, "serve.py")])
def test_usage_errors_look_the_same_everywhere(main, prog):
    err = refused(main, ["--model", "m", "--no-such-option"], expected="unrecognized arguments")
    assert err.startswith(f"{prog}: error: ") and err.rstrip().endswith("(see --help)")


# -- stale temporaries --------------------------------------------------------------------------------------------


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    stale = [f".model.safetensors.tmp{dead}", f"config.json.tmp{dead}", f".tokenizer.tmp{dead}-abc123",
             f".step-0000004.tmp{dead}"]
    kept = [f".model.safetensors.tmp{alive}", f"config.json.tmp{alive}", f"notes.tmp{dead}", "data.json"]
    for name in stale + kept:
        if "step" in name or "tokenizer" in name:
            (tmp_path / name).mkdir()
            (tmp_path / name / "trainable.safetensors").write_bytes(b"x")
        else:
            (tmp_path / name).write_text("x")
    imp.write_safetensors(str(tmp_path), {"w": torch.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["model.safetensors"])


def test_a_killed_checkpoint_is_cleaned_on_the_next_run(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    leftover = run / "checkpoints" / f".step-0000002.tmp{dead_pid()}"
    leftover.mkdir()
    (leftover / "state.pt").write_bytes(b"half")
    code, _, err = call(train.main, scratch_args(data, run, "--max-steps", 2, "--save-every", 1, "--resume"))
    assert code == 0, err
    assert sorted(os.listdir(run / "checkpoints")) == ["latest.json", "step-0000002"]


def test_write_json_leaves_no_temporary_when_the_write_fails(tmp_path):
    with pytest.raises(TypeError):
        imp.write_json(str(tmp_path / "x.json"), {"not json": object()})
    assert os.listdir(tmp_path) == []


def test_infer_batch_on_a_full_disk_keeps_the_answers_file(small_disk, model, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "text": "what shapes?", "max_new_tokens": 2}\n')
    with contextlib.suppress(OSError), open(small_disk / "filler", "wb") as filler:  # fill the tmpfs to the last byte
        while True:
            filler.write(b"\0" * 4096)
            filler.flush()
    refused(infer.main, ["--model", model, "--batch", questions, "--out", small_disk / "a.jsonl"], questions, model,
            expected="No space left on device")


def test_serve_non_finite_scores_are_a_model_error_not_an_internal_one():
    """Damaged weights (or a float16 cache past its range) reach serve.py's worker as imp.NotFiniteError: the
    request gets that message as a model_error, not "internal error" as if the server had a bug."""
    class DamagedModel:
        max_length = 64

        def reply(self, *args):
            raise imp.NotFiniteError("the model's next-token scores are not finite (NaN or inf)")
            yield  # a generator, as ImpReplies.reply
    job = serve.Job(dict(image=None, question="q", history=[], settings=dict(max_new_tokens=4), stops=[]), 0)
    serve.Worker(DamagedModel(), 1).answer(job)
    kind, error = job.events.get_nowait()
    assert kind == "error" and error.status == 500 and error.code == "model_error" and "not finite" in error.message
