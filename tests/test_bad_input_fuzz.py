"""Property test over the input formats: randomly damaged batch JSONL, LLaVA JSON, config.json, safetensors files
and images. Whatever the damage, a program either does its work (the damage was harmless) or says what is wrong
in one line with exit code 2, never a traceback, and leaves its inputs as they were.

Bounded and repeatable: a fixed seed per format and a fixed number of cases, all in this process (main(argv)).
"""
import io
import json
import math
import random
import shutil
import struct

import pytest
from PIL import Image

import imp
import infer
import quant
import train
from test_bad_input import DEMO, call, digest

# Values a damaged or hostile file might hold where a number, a string or an object is expected.
ODD_VALUES = [None, True, False, 0, -1, 3, 7, 1.5, 2**40, -2**70, 1e30, -1e30, math.inf, -math.inf, math.nan, "",
              "x", "4", "\udcff", "a\x00b", [], [1], {}, {"a": 1}]


def one_line_exit_2(code, err, allow_success=False):
    if allow_success and code == 0:
        return
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def damage_bytes(rng, data: bytes) -> bytes:
    """One random byte-level damage: truncate, flip bytes, insert junk, or replace everything."""
    kind = rng.randrange(4)
    if kind == 0:
        return data[:rng.randrange(len(data) + 1)]
    if kind == 1:
        data = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2:
        at = rng.randrange(len(data) + 1)
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[at:]
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))


def damage_object(rng, obj: dict, keys) -> dict:
    """Set, delete or retype one or two keys (a key "a.b" reaches into obj["a"])."""
    obj = json.loads(json.dumps(obj))
    for _ in range(rng.randint(1, 2)):
        path = rng.choice(keys).split(".")
        target = obj
        for part in path[:-1]:
            target = target.get(part) if isinstance(target.get(part), dict) else target
        if rng.random() < 0.2:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = rng.choice(ODD_VALUES)
    return obj


def serialize(rng, obj) -> bytes:
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)  # inf / nan become Infinity / NaN, as some writers do
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


def test_batch_jsonl(tmp_path):
    rng = random.Random(1)
    good = {"question_id": 1, "text": "what shapes?", "image": "a.png", "max_new_tokens": 4, "temperature": 0.5,
            "top_p": 0.9, "top_k": 3, "seed": 7}
    for case in range(80):
        line = serialize(rng, damage_object(rng, good, list(good)))
        if rng.random() < 0.3:
            line = damage_bytes(rng, line)
        questions = tmp_path / f"q{case}.jsonl"
        questions.write_bytes(b'{"question_id": 0, "text": "fine"}\n' + line + b"\n")
        before = digest(questions)
        code, _, err = call(infer.main, ["--model", tmp_path / "no-model", "--batch", questions,
                                         "--out", tmp_path / f"a{case}.jsonl"])
        one_line_exit_2(code, err)
        assert digest(questions) == before
        # Checked up front: either this line was refused, or everything was fine and the missing model is the error.
        assert "line 2" in err or "no such model folder" in err or questions.name in err, (line, err)


def test_llava_json(tmp_path):
    rng = random.Random(2)
    Image.new("RGB", (56, 56), (0, 0, 200)).save(tmp_path / "a.png")
    good = {"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                           {"from": "gpt", "value": "a blue square"}]}
    tokenizer = imp.load_tokenizer(DEMO)
    config = imp.parse_config(imp.open_checkpoint(DEMO), imp.ImpConfig)
    for case in range(80):
        record = damage_object(rng, good, ["id", "image", "conversations", "conversations.0", "conversations.1"])
        if rng.random() < 0.3 and isinstance(record.get("conversations"), list) and record["conversations"]:
            record["conversations"][0] = rng.choice(ODD_VALUES + [{"from": "gpt", "value": "x"}, {"value": 1}])
        data = serialize(rng, [good, record])
        if rng.random() < 0.25:
            data = damage_bytes(rng, data)
        path = tmp_path / f"d{case}.json"
        path.write_bytes(data)
        before = digest(tmp_path)
        try:  # train.py's reader: only its own one-line errors, which train.main prints as one line
            train.load_dataset(str(path), str(tmp_path), tokenizer, config, "phi2", 256, strict=True,
                               log=lambda *a: None)
        except (train.DataError, imp.ImageError, imp.CheckpointError):
            pass
        code, _, err = call(quant.main, ["--eval", "--model", tmp_path / "no-model", "--data", path])
        one_line_exit_2(code, err)
        assert digest(tmp_path) == before


@pytest.fixture
def folder(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(DEMO, copy)
    return copy


def ask(folder):
    return call(infer.main, ["--model", folder, "--text", "what?", "--max-new-tokens", 1])


def test_config_json(folder):
    rng = random.Random(3)
    good = json.load(open(folder / "config.json"))
    keys = [k for k in good if k != "vision_tower_config"] + [f"vision_tower_config.{k}"
                                                              for k in good["vision_tower_config"]]
    sizes = [k for k in keys if k.endswith(("_size", "_layers", "_heads", "_embeddings"))]  # where damage bites
    weights = digest(folder / "model.safetensors")
    for case in range(30):
        data = serialize(rng, damage_object(rng, good, sizes if case % 2 else keys))
        if rng.random() < 0.2:
            data = damage_bytes(rng, data)
        (folder / "config.json").write_bytes(data)
        code, _, err = ask(folder)
        one_line_exit_2(code, err, allow_success=True)
    assert digest(folder / "model.safetensors") == weights


def safetensors_variants(rng, original: bytes):
    """Damaged safetensors files: random bytes, a header length past the end (or 2**64 - 1), a truncated header or
    body, and headers whose entries lie (dtype, shape, offsets)."""
    length = struct.unpack("<Q", original[:8])[0]
    header = json.loads(original[8:8 + length])
    body = original[8 + length:]
    for case in range(30):
        kind = case % 6
        if kind == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        elif kind == 1:
            yield struct.pack("<Q", rng.choice([2**64 - 1, 2**63, length + 10**9, length + 1])) + original[8:]
        elif kind == 2:
            yield original[:rng.randrange(8, 8 + length)]
        elif kind == 3:
            yield original[:8 + length + rng.randrange(len(body))]
        else:
            lied = json.loads(json.dumps(header))
            name = rng.choice([k for k in lied if k != "__metadata__"])
            field = rng.choice(["dtype", "shape", "data_offsets"])
            lied[name][field] = rng.choice(ODD_VALUES[:-4] + ["F16", "I64", "X9", [1, 2], [-1, 5], [0, 10**12],
                                                              [10**30]])
            text = json.dumps(lied).encode()
            yield struct.pack("<Q", len(text)) + text + body


def test_safetensors_headers(folder):
    rng = random.Random(4)
    original = open(folder / "model.safetensors", "rb").read()
    config = digest(folder / "config.json")
    for data in safetensors_variants(rng, original):
        (folder / "model.safetensors").write_bytes(data)
        code, _, err = ask(folder)
        one_line_exit_2(code, err, allow_success=True)
    assert digest(folder / "config.json") == config


def image_variants(rng):
    picture = Image.new("RGB", (64, 48), (10, 200, 30))
    for case in range(60):
        fmt = ["PNG", "JPEG", "GIF", "WEBP"][case % 4]
        buffer = io.BytesIO()
        picture.save(buffer, fmt)
        yield fmt, damage_bytes(rng, buffer.getvalue())


def test_images(tmp_path, folder):
    """Damaged images of each format: the demo model answers about what still decodes, the rest is one line."""
    rng = random.Random(5)
    for case, (fmt, data) in enumerate(image_variants(rng)):
        path = tmp_path / f"image{case}.{fmt.lower()}"
        path.write_bytes(data)
        code, _, err = call(infer.main, ["--model", folder, path, "what?", "--max-new-tokens", 1])
        one_line_exit_2(code, err, allow_success=True)
        assert path.read_bytes() == data
        problem = train.image_problem(str(path))  # train.py's check before training: a reason, never a crash
        assert problem is None or isinstance(problem, str)
