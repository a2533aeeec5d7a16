"""infer.py, the command line: as a subprocess where the process matters (streaming, Ctrl-C, kill and resume,
piped chat, the demo model), in-process through infer.main(argv) everywhere else (no 4-second torch import each).

Models are tiny random Imps in the official layout, written by tests/reference.py. "chatty" has its lm_head bias
pushed towards the token "a", so its greedy answer is "aaaa..." until max_new_tokens: known text to assert on, and
an answer that never ends early (for Ctrl-C and the batch kill)."""
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import imp
import infer
import kernels
import reference as ref

INFER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "infer.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    phi, siglip, mm = ref.phi_model(), ref.siglip_model(), ref.projector()
    random_model = ref.write_imp(str(root / "random"), phi, siglip, mm)
    letter_a = imp.load_tokenizer(random_model).token_to_id("a")
    with torch.no_grad():
        phi.lm_head.bias[letter_a] += 100.0
    return dict(random=random_model, chatty=ref.write_imp(str(root / "chatty"), phi, siglip, mm),
                legacy=ref.write_imp(str(root / "legacy"), phi, siglip, mm, legacy=True), root=root)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    path = lambda name: str(folder / name)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(path("photo.png"))
    noise.save(path("photo.jpg"), quality=90)
    png, jpeg = open(path("photo.png"), "rb").read(), open(path("photo.jpg"), "rb").read()
    open(path("truncated.png"), "wb").write(png[:len(png) // 2])
    open(path("truncated.jpg"), "wb").write(jpeg[:len(jpeg) // 2])
    damaged = bytearray(png)
    damaged[len(png) // 2] ^= 0xFF  # one flipped byte inside the compressed pixels
    open(path("corrupt.png"), "wb").write(bytes(damaged))
    open(path("corrupt.jpg"), "wb").write(jpeg[:4] + bytes(np.random.default_rng(1).integers(0, 255, 2000, np.uint8)))
    open(path("notes.jpg"), "w").write("this is a text file with an image's name\n")
    # A valid PNG header claiming 20000 x 20000 pixels: PIL's decompression-bomb check fires before any pixel data.
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    open(path("bomb.png"), "wb").write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b""))
    frames = [Image.new("RGB", (20, 20), color) for color in ("red", "green", "blue")]
    frames[0].save(path("animated.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray((np.arange(400).reshape(20, 20) * 150).astype(np.uint16)).save(path("deep.png"))  # 16-bit grey
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(path("cmyk.jpg"))
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(path("palette.png"), transparency=0)
    Image.new("RGB", (1, 1), "white").save(path("pixel.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display": stored 60 wide x 30 high, shown 30 wide x 60 high
    Image.new("RGB", (60, 30), "red").save(path("rotated.jpg"), exif=exif.tobytes())
    os.mkdir(path("a-folder"))
    return folder


def call(capsys, *argv):
    """infer.main in this process -> (exit code, stdout, stderr)."""
    code = infer.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def start(*argv, **options):
    """infer.py as a real process, without IMP_MODEL from the environment."""
    env = {k: v for k, v in os.environ.items() if k != "IMP_MODEL"}
    return subprocess.Popen([sys.executable, INFER, *map(str, argv)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **options)


# -- answering ---------------------------------------------------------------------------------------------------

def test_streams_the_answer_as_a_process(models, images):
    process = start("--model", models["chatty"], images / "photo.png", "What is in the picture?",
                    "--max-new-tokens", 5)
    out, err = process.communicate(timeout=120)
    assert (process.returncode, out, err) == (0, "aaaaa\n", "")


@pytest.mark.parametrize("layout", ["chatty", "legacy"])
def test_both_official_layouts(capsys, models, images, layout):
    code, out, err = call(capsys, "--model", models[layout], images / "photo.jpg", "What?", "--max-new-tokens", 3)
    assert (code, out) == (0, "aaa\n")


def test_text_only_question(capsys, models, monkeypatch):
    seen = []
    original = imp.prepare_inputs
    monkeypatch.setattr(imp, "prepare_inputs", lambda model, image, *rest, **kw: seen.append(image) or
                        original(model, image, *rest, **kw))
    code, out, err = call(capsys, "--model", models["chatty"], "--text", "Say something.", "--max-new-tokens", 4)
    assert (code, out, seen) == (0, "aaaa\n", [None])


def test_options_reach_the_model(capsys, models, images, monkeypatch):
    seen = {}
    prepare, generate = imp.prepare_inputs, imp.Imp.generate
    monkeypatch.setattr(imp, "prepare_inputs", lambda model, *a, **kw: seen.update(kw) or prepare(model, *a, **kw))
    monkeypatch.setattr(imp.Imp, "generate", lambda self, *a, **kw: seen.update(
        {k: v for k, v in kw.items() if k != "inputs_embeds"}, dtype=self.llm.lm_head.weight.dtype)
        or generate(self, *a, **kw))
    code, _, err = call(capsys, "--model", models["random"], "--dtype", "bfloat16", "--aspect", "pad", "--temperature",
                        0.8, "--top-p", 0.9, "--top-k", 5, "--seed", 1, "--threads", 1, "--image-size", 56,
                        images / "photo.png", "What?", "--max-new-tokens", 4)
    assert code == 0, err
    assert seen == dict(aspect="pad", max_new_tokens=4, temperature=0.8, top_p=0.9, top_k=5, seed=1,
                        cache_dtype=None, dtype=torch.bfloat16)


def test_sampling_with_a_seed_repeats(capsys, models, images):
    argv = ["--model", models["random"], images / "photo.png", "Hi", "--temperature", 1.0, "--seed", 7,
            "--max-new-tokens", 12]
    first, second = call(capsys, *argv), call(capsys, *argv)
    assert first[0] == 0 and first == second


def test_quantize_on_load(capsys, models, images):
    code, out, err = call(capsys, "--model", models["chatty"], "--quant", "int8", images / "photo.png", "What?",
                          "--max-new-tokens", 3)
    assert (code, out) == (0, "aaa\n"), err  # a +100 bias survives int8 rounding


def test_int8_activations(capsys, models, images, monkeypatch):
    if not kernels.int8_matmul_available():
        pytest.skip("torch._int_mm does not work here")
    monkeypatch.setattr(kernels, "FAST_PATH_MAX_ROWS", 4)  # this tiny prompt has ~30 rows: let them take the path
    monkeypatch.setattr(kernels, "int8_products_are_native", lambda: True)  # VNNI or not, on this machine
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **k: calls.append(a[0].shape) or int_mm(*a, **k))
    for bits in ("int8", "int4"):
        code, out, err = call(capsys, "--model", models["chatty"], "--quant", bits, "--int8-activations", "--stats",
                              images / "photo.png", "What?", "--max-new-tokens", 3)
        assert (code, out) == (0, "aaa\n"), err
        assert calls and "int8 activations" in err.splitlines()[0]  # used, and said so in --stats
        calls.clear()
    code, out, err = call(capsys, "--model", models["chatty"], "--quant", "int8", images / "photo.png", "What?",
                          "--max-new-tokens", 3)
    assert (code, out) == (0, "aaa\n") and not calls  # off by default
    monkeypatch.setattr(kernels, "int8_products_are_native", lambda: False)  # a CPU without VNNI / AMX
    if kernels.compiled_decode_pays():  # x86 with AVX2 and a C compiler: decode through kernels.c, prefill in float
        code, out, err = call(capsys, "--model", models["chatty"], "--quant", "int4", "--int8-activations", "--stats",
                              images / "photo.png", "What?", "--max-new-tokens", 3)
        assert (code, out) == (0, "aaa\n") and not calls
        assert "note: --int8-activations: int8 activations in" in err
        assert "decoding through kernels.c; prefill and vision in float: this CPU has no int8 dot-product" in err
    monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)  # ... and no C compiler
    code, out, err = call(capsys, "--model", models["chatty"], "--quant", "int4", "--int8-activations",
                          images / "photo.png", "What?", "--max-new-tokens", 3)
    assert (code, out) == (0, "aaa\n") and not calls  # left off, and said why
    assert "int8 activations off: this CPU has no int8 dot-product instructions" in err


@pytest.mark.parametrize("argv, expected", [((), None), (("--quant", "int8"), torch.float16),
                                             (("--quant", "int4", "--kv-cache", "float32"), torch.float32),
                                             (("--kv-cache", "bfloat16"), torch.bfloat16)])
def test_kv_cache_dtype(capsys, models, images, monkeypatch, argv, expected):
    """auto: a 16-bit cache for a quantized float32 model (half the cache's memory), the model's own otherwise."""
    seen = {}
    original = imp.Imp.generate
    monkeypatch.setattr(imp.Imp, "generate", lambda self, *a, **kw: seen.update(kw) or original(self, *a, **kw))
    code, out, err = call(capsys, "--model", models["chatty"], "--dtype", "float32", *argv, images / "photo.png",
                          "What?", "--max-new-tokens", 3)
    assert (code, out) == (0, "aaa\n"), err
    assert seen["cache_dtype"] == expected


def test_stats_prints_the_table_4_figures(capsys, models, images):
    code, out, err = call(capsys, "--model", models["chatty"], "--stats", images / "photo.png", "What?",
                          "--max-new-tokens", 6)
    assert (code, out) == (0, "aaaaaa\n")
    figures = {line.split()[0] + (" " + line.split()[1] if line.split()[1] in ("load", "tokens", "RSS", "cache") else ""): line
               for line in err.splitlines()[1:]}
    assert set(figures) == {"model load", "T_VE", "prompt tokens", "S_prompt", "generated tokens", "S_gen",
                            "T_total", "KV cache", "peak RSS"}
    positions = int(figures["prompt tokens"].split()[2]) + 6
    if kernels.best_cpu_dtype() == torch.float32:  # the default dtype: float32, or bfloat16 where it is native
        assert f"float32, 0.00 GB for {positions} positions; decode attention: the fused kernel in float32" \
            in figures["KV cache"]
    else:
        how = "kernels.c, reading the cache as it is" if kernels.compiled_kernels() else "written out in torch"
        assert f"bfloat16, 0.00 GB for {positions} positions; decode attention: products in float32 ({how})" \
            in figures["KV cache"]
    prompt_tokens = int(figures["prompt tokens"].split()[2])
    assert prompt_tokens > 16  # the 16 image embeddings of a 56-px image are counted as prompt tokens
    assert int(figures["generated tokens"].split()[2]) == 6
    assert float(figures["T_total"].split()[1]) >= float(figures["T_VE"].split()[1])


def test_explain_shows_real_shapes(capsys, models, images):
    code, out, err = call(capsys, "--model", models["chatty"], "--explain", images / "rotated.jpg", "What?",
                          "--max-new-tokens", 2)
    assert (code, out) == (0, "aa\n")
    assert "30x60 RGB" in err  # stored 60x30 with EXIF "rotate 90": the model sees the upright picture
    for expected in ("pixel tensor (1, 3, 56, 56)", "4x4 grid = 16 patches of 144 dims", "2 of SigLIP's 3 layers",
                     "(1, 16, 144) -> (1, 16, 160)", "- 1 + 16 =", "2 layers of 160 dims", "2 tokens"):
        assert expected in err


def test_exif_rotated_image_is_used_upright(capsys, models, images, monkeypatch):
    sizes = []
    original = imp.preprocess_image
    monkeypatch.setattr(imp, "preprocess_image", lambda image, *a: sizes.append(image.size) or original(image, *a))
    assert call(capsys, "--model", models["chatty"], images / "rotated.jpg", "What?", "--max-new-tokens", 1)[0] == 0
    assert sizes == [(30, 60)]


@pytest.mark.parametrize("name", ["animated.gif", "deep.png", "cmyk.jpg", "palette.png", "pixel.png"])
def test_unusual_images_work(capsys, models, images, name):
    code, out, err = call(capsys, "--model", models["chatty"], images / name, "What?", "--max-new-tokens", 2)
    assert (code, out) == (0, "aa\n"), err
    if name == "animated.gif":
        assert "animated (3 frames): using its first" in err


@pytest.mark.parametrize("layout", ["random", "legacy"])
@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_attention_map_has_the_image_size_and_is_deterministic(capsys, models, images, tmp_path, layout, aspect):
    """rotated.jpg is stored 60x30 and displayed 30x60 (EXIF): the map follows the picture as displayed."""
    maps = [tmp_path / "first.png", tmp_path / "second.png"]
    for target in maps:
        code, out, err = call(capsys, "--model", models[layout], "--aspect", aspect, "--attention-map", target,
                              images / "rotated.jpg", "What is in the picture?", "--max-new-tokens", 4)
        assert code == 0 and out.strip(), err
        assert f"attention map: {target} (4x4 patches" in err  # 56 px in patches of 14: SigLIP's 4x4 grid
    picture = Image.open(maps[0])
    assert (picture.format, picture.mode, picture.size) == ("PNG", "RGB", (30, 60))
    assert maps[0].read_bytes() == maps[1].read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.png", "second.png"]  # no temporary file left


# -- bad input: one line on stderr, exit 2 -----------------------------------------------------------------------

def bad_model_folders(root):
    folders = {}
    good = os.path.join(str(root), "chatty")
    for name in ("empty", "bad-json", "not-imp", "truncated"):
        folders[name] = folder = root / f"broken-{name}"
        folder.mkdir(exist_ok=True)
        for file in os.listdir(good) if name != "empty" else []:
            data = open(os.path.join(good, file), "rb").read()
            if file == "config.json":
                data = {"bad-json": b"{not json", "not-imp": b"{}"}.get(name, data)
            if file.endswith(".safetensors") and name == "truncated":  # an interrupted download
                data = data[:len(data) // 3]
            (folder / file).write_bytes(data)
    return folders


BAD_INPUTS = [  # (case, arguments after --model, a word the message must contain)
    ("missing image", ["nowhere.png", "What?"], "no such file"),
    ("a directory", ["a-folder", "What?"], "folder"),
    ("text file named .jpg", ["notes.jpg", "What?"], "not an image"),
    ("truncated PNG", ["truncated.png", "What?"], "damaged"),
    ("corrupt PNG", ["corrupt.png", "What?"], "damaged"),
    ("truncated JPEG", ["truncated.jpg", "What?"], "damaged"),
    ("corrupt JPEG", ["corrupt.jpg", "What?"], "damaged"),
    ("decompression bomb", ["bomb.png", "What?"], "too large"),
    ("empty question", ["photo.png", ""], "empty"),
    ("whitespace question", ["photo.png", "  \t\n "], "empty"),
    ("empty text question", ["--text", " "], "empty"),
    ("too long for the context", ["photo.png", "word " * 3100], "context"),
    ("question without image", ["What is this?"], "--text"),
    ("nothing to ask", [], "nothing to ask"),
    ("other image size", ["--image-size", "384", "photo.png", "What?"], "trained at 56 px"),
    ("bad max-new-tokens", ["--max-new-tokens", "0", "photo.png", "What?"], "max_new_tokens"),
    ("bad top-p", ["--top-p", "1.5", "photo.png", "What?"], "top_p"),
    ("batch without out", ["--batch", "questions.jsonl"], "--out"),
    ("unknown option", ["--colour", "photo.png", "What?"], "unrecognized"),
    ("attention map of a text question", ["--attention-map", "map.png", "--text", "Hi"], "needs an image"),
    ("attention map in a chat", ["--attention-map", "map.png", "--chat", "photo.png"], "not --chat or --batch"),
    ("attention map, unknown format", ["--attention-map", "map.xyz", "photo.png", "What?"], "picture format"),
    ("attention map, no such folder", ["--attention-map", "nowhere/map.png", "photo.png", "What?"], "does not exist"),
    ("int8 activations of a float model", ["--int8-activations", "photo.png", "What?"], "needs a quantized model"),
]


@pytest.mark.parametrize("case,argv,expected", BAD_INPUTS, ids=[case for case, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(capsys, models, images, monkeypatch, case, argv, expected):
    monkeypatch.chdir(images)
    code, out, err = call(capsys, "--model", models["chatty"], *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("infer.py: error: ") and expected in err, err


@pytest.mark.parametrize("case,expected", [("missing", "no such model folder"), ("empty", "no config.json"),
                                           ("bad-json", "not valid JSON"), ("not-imp", "not a valid imp config"),
                                           ("truncated", "truncated")])
def test_missing_or_broken_model_folder(capsys, models, images, case, expected):
    folder = models["root"] / "nowhere" if case == "missing" else bad_model_folders(models["root"])[case]
    code, out, err = call(capsys, "--model", folder, images / "photo.png", "What?")
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_no_model_anywhere_says_how_to_download(capsys, images, monkeypatch, tmp_path):
    monkeypatch.delenv("IMP_MODEL", raising=False)
    monkeypatch.setattr(infer, "DEMO_MODEL", str(tmp_path / "no-demo"))
    code, out, err = call(capsys, images / "photo.png", "What?")
    assert code == 2 and err.count("\n") == 1
    assert "huggingface-cli download MILVLG/imp-v1-3b --local-dir imp-v1-3b" in err and "--model" in err


def test_model_from_the_environment(capsys, models, images, monkeypatch):
    monkeypatch.setenv("IMP_MODEL", models["chatty"])
    assert call(capsys, images / "photo.png", "What?", "--max-new-tokens", 2)[:2] == (0, "aa\n")


def test_demo_model_is_the_default(images):
    if not os.path.isdir(infer.DEMO_MODEL):
        pytest.skip("checkpoints/demo is not there yet (train.py writes it)")
    examples = os.path.join(os.path.dirname(INFER), "examples")
    pictures = sorted(name for name in os.listdir(examples) if name.endswith((".png", ".jpg"))) \
        if os.path.isdir(examples) else []
    image = os.path.join(examples, pictures[0]) if pictures else images / "photo.png"
    process = start(image, "How many shapes are there?", "--max-new-tokens", 24)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert out.strip() and "tiny demo model" in err and "MILVLG/imp-v1-3b" in err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "examples:" in out and "--batch questions.jsonl --out answers.jsonl" in out and "130" in out


def test_ctrl_c_keeps_what_was_generated_and_exits_130(models, images):
    # SIG_DFL in the child: a shell that starts a background job (CI scripts, `cmd &`) sets SIGINT to "ignore",
    # the child would inherit that, and Python then never turns Ctrl-C into KeyboardInterrupt.
    process = start("--model", models["chatty"], images / "photo.png", "What?", "--max-new-tokens", 2500,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = process.stdout.read(1)  # blocks until the first token is streamed
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=60)
    out = first + rest
    assert process.returncode == 130, err
    assert out.endswith("\n") and set(out.strip()) == {"a"} and 1 <= len(out.strip()) < 2500
    assert "interrupted" in err and "Traceback" not in err


# -- chat ----------------------------------------------------------------------------------------------------------

def test_chat_over_piped_stdin(models, images):
    script = "What?\n\n/image pixel.png\nAnd now?\n/image nowhere.png\n/frobnicate\nStill there?\n/quit\nNot read\n"
    process = start("--model", models["chatty"], "--chat", "photo.png", "--max-new-tokens", 3, cwd=images)
    out, err = process.communicate(script, timeout=120)
    assert process.returncode == 0, err
    assert out == "aaa\naaa\naaa\n"  # three questions, three answers; the empty line is skipped
    assert "nowhere.png: no such file" in err and "unknown command /frobnicate" in err


def test_chat_keeps_history_in_the_template(capsys, models, images, monkeypatch):
    calls = []
    original = imp.prepare_inputs
    monkeypatch.setattr(imp, "prepare_inputs", lambda model, image, question, history, **kw:
                        calls.append((image is not None, question, list(history))) or
                        original(model, image, question, history, **kw))
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("One\nTwo\n/reset\nThree\n/image\nFour\n"))
    code, out, err = call(capsys, "--model", models["chatty"], "--chat", images / "photo.png", "--max-new-tokens", 2)
    assert code == 0, err
    assert calls == [(True, "One", []), (True, "Two", [("One", "aa")]), (True, "Three", []), (False, "Four", [])]


# -- batch ---------------------------------------------------------------------------------------------------------

def write_questions(folder, questions):
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


def read_answers(path):
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_batch_resumes_after_a_kill(models, images, tmp_path):
    (tmp_path / "pictures").mkdir()
    Image.open(images / "photo.png").save(tmp_path / "pictures" / "photo.png")
    questions = [dict(question_id=f"q{n}", image="pictures/photo.png", text=f"Question {n}?") for n in range(12)]
    questions[3] = dict(question_id=3, text="No image here?")                       # text only, an integer id
    questions[5] = dict(question_id="q5", image="pictures/missing.png", text="?")   # a bad image: an error record
    questions[7]["max_new_tokens"] = 2                                               # a per-line setting
    source, answers = write_questions(tmp_path, questions), tmp_path / "answers.jsonl"
    # 48 tokens per answer keeps a question slow enough (tens of ms) for the kill to land mid-file
    argv = ["--model", models["chatty"], "--batch", source, "--out", answers, "--max-new-tokens", 48]

    process = start(*argv)
    deadline = time.time() + 120
    while time.time() < deadline and (not answers.exists() or answers.read_text().count("\n") < 2):
        time.sleep(0.05)
    process.kill()  # SIGKILL: no cleanup at all, as in a crash
    process.communicate()
    killed_at = len(read_answers(answers)) if answers.read_text().endswith("\n") else None
    bad_image_done = '"q5"' in answers.read_text()  # its error record, if the first run got that far
    with open(answers, "a") as f:
        f.write('{"question_id": "q11", "text": "half a li')  # what a kill during a write leaves behind

    process = start(*argv)
    out, err = process.communicate(timeout=300)
    assert process.returncode == (0 if bad_image_done else 1), err  # 1: this run had a failed question
    assert "incomplete last line" in err and "already answered" in err and "[12/12]" in err
    records = read_answers(answers)
    assert sorted(map(str, (r["question_id"] for r in records))) == sorted(str(q["question_id"]) for q in questions)
    assert killed_at is None or killed_at < 12  # the kill really came mid-file
    by_id = {r["question_id"]: r for r in records}
    assert "no such file" in by_id["q5"]["error"] and "text" not in by_id["q5"]
    assert by_id["q7"]["text"] == "aa" and by_id[3]["text"] == "a" * 48 and "image" not in by_id[3]
    assert by_id["q0"]["model"] == "chatty" and by_id["q0"]["prompt_tokens"] > 16
    assert {"vision_seconds", "prompt_seconds", "generate_seconds", "total_seconds"} <= set(by_id["q0"])


def test_batch_refuses_paths_leaving_the_image_folder(capsys, models, images, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    (tmp_path / "data").mkdir()
    os.symlink(secret, tmp_path / "data" / "link.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "fine.png")
    questions = [dict(question_id=1, image="../secret.png", text="?"), dict(question_id=2, image=str(secret), text="?"),
                 dict(question_id=3, image="link.png", text="?"), dict(question_id=4, image="fine.png", text="?")]
    source, answers = write_questions(tmp_path / "data", questions), tmp_path / "answers.jsonl"
    code, out, err = call(capsys, "--model", models["chatty"], "--batch", source, "--out", answers,
                          "--max-new-tokens", 1)
    records = {r["question_id"]: r for r in read_answers(answers)}
    assert code == 1 and out == ""
    assert all("outside the image folder" in records[n]["error"] for n in (1, 2, 3))
    assert records[4]["text"] == "a"
    # --image-folder moves the base: now the secret's folder is inside, and a rerun still skips answered ids.
    code, _, err = call(capsys, "--model", models["chatty"], "--batch", source, "--out", answers, "--image-folder",
                        tmp_path)
    assert code == 0 and "already answered" in err and len(read_answers(answers)) == 4


@pytest.mark.parametrize("lines,expected", [
    (['{"question_id": 1, "text": "a"}', "{oops"], "line 2: not valid JSON"),
    (['{"question_id": 1, "text": "a"}', '{"question_id": 1, "text": "b"}'], "appears twice"),
    (['{"text": "a"}'], "question_id"),
    (['{"question_id": 1, "text": "  "}'], "empty \"text\""),
    (['{"question_id": 1, "text": "a", "temperature": -1}'], "temperature"),
    (['{"question_id": 1, "text": "a", "max_new_tokens": "many"}'], "max_new_tokens must be an integer"),
    ([], "no questions"),
])
def test_batch_input_is_checked_before_loading(capsys, tmp_path, lines, expected):
    source = tmp_path / "questions.jsonl"
    source.write_text("\n".join(lines) + "\n")
    code, out, err = call(capsys, "--model", tmp_path / "no-model-needed", "--batch", source, "--out",
                          tmp_path / "answers.jsonl")
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_batch_will_not_append_to_a_foreign_file(capsys, models, tmp_path):
    source = write_questions(tmp_path, [dict(question_id=1, text="Hi")])
    answers = tmp_path / "answers.jsonl"
    answers.write_text("this is not an answers file\n")
    code, out, err = call(capsys, "--model", models["chatty"], "--batch", source, "--out", answers)
    assert code == 2 and "line 1: not an answer record" in err
    assert answers.read_text() == "this is not an answers file\n"
