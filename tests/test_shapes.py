"""Tests for shapes.py: determinism, answers that agree with the pixels and the scene, the splits, the tokenizer and the CLI."""
import hashlib
import json
import os
import random
import re

import pytest

import shapes


def scenes(count, image_size=shapes.IMAGE_SIZE, start=0, layout="grid", position="half"):
    """(image, scene, questions) for seeds start .. start+count-1, built exactly as the public API is meant to be used."""
    for seed in range(start, start + count):
        rng = random.Random(seed)
        image, scene = shapes.make_scene(rng, image_size, layout)
        yield image, scene, shapes.make_questions(rng, scene, position, image_size)


def test_same_seed_same_sample_and_different_seed_different_sample():
    first = list(scenes(5))
    again = list(scenes(5))
    for (image_a, scene_a, questions_a), (image_b, scene_b, questions_b) in zip(first, again):
        assert image_a.tobytes() == image_b.tobytes()
        assert scene_a == scene_b and questions_a == questions_b
    other = list(scenes(5, start=100))
    assert all(a[0].tobytes() != b[0].tobytes() for a, b in zip(first, other))


@pytest.mark.parametrize("layout", shapes.LAYOUTS)
def test_shapes_inside_image_apart_and_drawn_where_the_scene_says(layout):
    for image_size in (56, 112, 64):
        for image, scene, _ in scenes(300, image_size, layout=layout):
            assert 1 <= len(scene) <= 3 and image.size == (image_size, image_size)
            for index, item in enumerate(scene):
                x0, y0, x1, y1 = item["box"]
                assert 0 < x0 < x1 < image_size and 0 < y0 < y1 < image_size
                for other in scene[index + 1:]:
                    assert not shapes._boxes_touch(item["box"], other["box"])
                # The pixel a little below the centre lies inside every shape, triangles included. It must be close to
                # the named colour (the jitter is at most 15 per channel).
                pixel = image.getpixel((int(item["x"]), int(item["y"] + item["side"] / 6)))
                assert max(abs(p - c) for p, c in zip(pixel, shapes.COLORS[item["color"]])) <= 15, (item, pixel)
            # The scene is listed left to right (then top to bottom), which captions and position answers rely on.
            assert [(i["x"], i["y"]) for i in scene] == sorted((i["x"], i["y"]) for i in scene)
    # The two sizes never get close to each other, so "small" vs "large" can be seen.
    small = [i["side"] for _, s, _ in scenes(300, layout=layout) for i in s if i["size"] == "small"]
    large = [i["side"] for _, s, _ in scenes(300, layout=layout) for i in s if i["size"] == "large"]
    assert max(small) * 1.4 < min(large)


@pytest.mark.parametrize("image_size, cells, spread", [(56, {"small": 1, "large": 2}, 20),  # 4 x 4 cells: 16 + 9 places
                                                       (112, {"small": 2, "large": 3}, 60)])
def test_grid_layout_puts_every_shape_on_whole_patch_cells(image_size, cells, spread):
    """The point of the grid layout: a shape of a given kind and size looks the same, pixel for pixel, in every
    patch-aligned block it lands on, so one patch already shows which shape it belongs to."""
    looks, positions = {}, set()
    for image, scene, _ in scenes(400, image_size):
        for item in scene:
            x0, y0, x1, y1 = item["box"]
            assert (x0 - 2) % shapes.PATCH == 0 and (y0 - 2) % shapes.PATCH == 0  # 2 px inside a cell's corner
            assert item["side"] == cells[item["size"]] * shapes.PATCH - 4  # 10 and 24 px at 56; 24 and 38 at 112
            block = image.crop((x0 - 2, y0 - 2, x1 + 2, y1 + 2))
            raw = block.tobytes()  # RGB, 3 bytes per pixel; the block's corner pixel is background
            mask = bytes(raw[i:i + 3] != raw[:3] for i in range(0, len(raw), 3))  # which pixels the shape covers
            looks.setdefault((item["shape"], item["size"]), set()).add(mask)
            positions.add((item["size"], x0, y0))
    assert len(looks) == 6 and all(len(masks) == 1 for masks in looks.values())  # one look per shape and size
    assert len({mask for masks in looks.values() for mask in masks}) == 6  # and the six looks all differ
    assert len(positions) > spread  # while the shapes still go all over the grid
    with pytest.raises(ValueError, match="layout"):
        shapes.make_scene(random.Random(0), 112, "diagonal")


def answer_from_scene(kind, question, scene, image_size=shapes.IMAGE_SIZE):
    """An independent oracle: read the question back and compute the expected answer from the scene."""
    words = re.findall(r"[a-z]+", question.lower())
    named_shapes = [w for w in words if w in shapes.SHAPES]
    named_colors = [w for w in words if w in shapes.COLORS]
    if kind == "count":
        return "There is 1 shape." if len(scene) == 1 else f"There are {len(scene)} shapes."
    if kind == "exists":
        present = any(i["color"] == named_colors[0] and i["shape"] == named_shapes[0] for i in scene)
        return "Yes, there is." if present else "No, there is not."
    if kind == "shape":
        (item,) = [i for i in scene if i["color"] == named_colors[0]]  # must be exactly one
        return f"It is a {item['shape']}."
    if kind == "position" and named_shapes:  # --position half: which half is the named shape in?
        (item,) = [i for i in scene if i["shape"] == named_shapes[0]]
        x0, _, x1, _ = item["box"]
        middle = image_size / 2
        assert x1 <= middle or x0 >= middle  # wholly in one half
        return f"The {item['shape']} is on the {'left' if x1 <= middle else 'right'}."
    if kind == "position":
        side = "left" if "left" in words else "right"
        assert len(scene) == 2 and scene[0]["box"][2] < scene[1]["box"][0]
        item = min(scene, key=lambda i: i["x"]) if side == "left" else max(scene, key=lambda i: i["x"])
        return f"The {item['shape']} is on the {side}."
    (item,) = [i for i in scene if i["shape"] == named_shapes[0]]  # color and size: exactly one such shape
    return f"The {item['shape']} is {item['color'] if kind == 'color' else item['size']}."


@pytest.mark.parametrize("image_size, position", [(56, "half"), (56, "compare"), (112, "half"), (112, "compare")])
def test_answers_agree_with_the_scene(image_size, position):
    seen = set()
    for _, scene, questions in scenes(500, image_size, position=position):
        assert len({q["type"] for q in questions}) == len(questions)  # at most one question per type
        for q in questions:
            assert q["answer"] == answer_from_scene(q["type"], q["question"], scene, image_size), (q, scene)
            seen.add(q["type"])
    assert seen == set(shapes.TYPES)


def test_half_position_questions_agree_with_the_scene_and_are_common(tmp_path):
    asked = 0
    for seed in range(500):
        rng = random.Random(seed)
        _, scene = shapes.make_scene(rng)
        for q in shapes.make_questions(rng, scene, position="half"):
            assert q["answer"] == answer_from_scene(q["type"], q["question"], scene), (q, scene)
            if q["type"] == "position":
                assert "shape is" not in q["question"]  # never the two-shape "Which shape is on the left?"
                asked += 1
    assert asked > 300  # most pictures have a unique shape wholly in one half; left/right "compare": ~13%
    with pytest.raises(ValueError, match="position must be one of"):
        shapes.make_questions(random.Random(0), scene, position="halves")
    shapes.generate_dataset(str(tmp_path), 300, 100, seed=1, progress=False, position="half")
    train, test = (json.loads((tmp_path / f"{split}.json").read_text()) for split in ("train", "test"))
    first_turns = [record["type"] for record in train]
    # Unlike "compare", a half question is not moved to the front: it is one turn among the others.
    assert 0.05 < first_turns.count("position") / len(first_turns) < 0.35
    assert 5 < sum(record["type"] == "position" for record in test) < 35
    assert any("on the left or on the right" in turn["value"] for record in test for turn in record["conversations"])


def test_exists_answers_are_balanced():
    answers = [q["answer"] for _, _, qs in scenes(400) for q in qs if q["type"] == "exists"]
    assert len(answers) == 400
    yes = sum(a.startswith("Yes") for a in answers)
    assert 0.42 < yes / len(answers) < 0.58, yes


def test_caption_lists_shapes_left_to_right():
    scene = [dict(shape="circle", color="red", size="large", x=10), dict(shape="triangle", color="blue", size="small", x=50)]
    assert shapes.caption(scene) == "A large red circle and a small blue triangle."
    assert shapes.caption(scene[:1]) == "A large red circle."
    three = scene + [dict(shape="square", color="green", size="small", x=90)]
    assert shapes.caption(three) == "A large red circle, a small blue triangle and a small green square."
    centred = dict(shape="square", color="green", size="small", x=57)
    assert (shapes.caption(scene + [centred], sides=True, image_size=112) == "A large red circle on the left, a small "
            "blue triangle on the left and a small green square in the middle.")  # x 50 < 56 - 2: left; 57 within 2 px
    assert shapes.caption(three[2:], sides=True, image_size=112) == "A small green square on the right."
    assert shapes.caption(scene, sides=True) == ("A large red circle on the left and a small blue triangle on the "
                                                 "right.")  # the demo's 56-px pictures: 50 is right of the middle


def test_left_right_share_adds_left_right_questions_to_the_train_split_only(tmp_path):
    plain, boosted = tmp_path / "plain", tmp_path / "boosted"
    shapes.generate_dataset(str(plain), 200, 20, seed=5, progress=False, position="compare")
    shapes.generate_dataset(str(boosted), 200, 20, seed=5, progress=False, position="compare", left_right_share=0.5)
    with pytest.raises(ValueError, match="compare"):  # "half" questions need no boost: most pictures have one
        shapes.generate_dataset(str(tmp_path / "half"), 2, 1, progress=False, left_right_share=0.5)

    def share(folder):  # a left/right question, when a picture has one, is always its first turn
        train = json.loads((folder / "train.json").read_text())
        return sum(record["type"] == "position" for record in train) / len(train)
    assert share(plain) < 0.25 and share(boosted) > 0.45  # ~13% and ~0.5 + 0.5 x 13%
    assert (plain / "test.json").read_bytes() == (boosted / "test.json").read_bytes()
    for record in json.loads((boosted / "test.json").read_text()):
        assert (plain / record["image"]).read_bytes() == (boosted / record["image"]).read_bytes()


@pytest.fixture(scope="module")
def tokenizer():
    records = []
    for index, (_, scene, questions) in enumerate(scenes(200)):
        records.append({"conversations": [{"from": "human", "value": "<image>\n" + questions[0]["question"]},
                                          {"from": "gpt", "value": questions[0]["answer"]},
                                          {"from": "gpt", "value": shapes.caption(scene)}]})
    return shapes.train_tokenizer(shapes.corpus_texts(records), vocab_size=512)


def test_tokenizer_special_token_ids(tokenizer):
    size = tokenizer.get_vocab_size()
    assert size <= 512
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.token_to_id("</s>") == size - 2
    assert tokenizer.token_to_id("<image>") == size - 1
    # Inside text, the special tokens are always one id each, whatever surrounds them.
    ids = tokenizer.encode("USER: <image>\nIs there a red circle? ASSISTANT: Yes, there is.</s>").ids
    assert ids.count(size - 1) == 1 and ids[-1] == size - 2
    assert tokenizer.encode("x<image>y</s>z").ids[1:4:2] == [size - 1, size - 2]
    # They are *special* tokens, so decoding a generated answer can drop them.
    assert tokenizer.decode(tokenizer.encode("<|endoftext|>Yes, there is.</s>").ids) == "Yes, there is."


def test_tokenizer_round_trip_and_compact_prompt(tokenizer):
    text = "Is  there   a grüner Würfel? ✓ 🙂\n\ttabs <image> and </s> too "
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    prompt = (f"{shapes.SYSTEM_PROMPT} USER: <image>\nWhat color is the circle? ASSISTANT: The circle is red.</s>")
    assert len(tokenizer.encode(prompt).ids) < 60  # whole words, not bytes


def test_cli_writes_valid_llava_json_with_held_out_test(tmp_path, capsys):
    out = tmp_path / "shapes"
    shapes.main(["--out", str(out), "--train", "30", "--test", "10", "--seed", "3", "--tokenizer-out", str(out)])
    printed = capsys.readouterr().out
    assert '"train_images": 30' in printed and "tokenizer:" in printed

    captions = json.loads((out / "captions.json").read_text())
    train = json.loads((out / "train.json").read_text())
    test = json.loads((out / "test.json").read_text())
    assert (len(captions), len(train), len(test)) == (30, 30, 10)
    for record in captions:
        assert record["conversations"][0] == {"from": "human", "value": "<image>"}
        assert record["conversations"][1]["from"] == "gpt"
    for record in train + test:
        assert not os.path.isabs(record["image"]) and (out / record["image"]).is_file()
        assert record["type"] in shapes.TYPES
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and 2 <= len(turns) <= 12
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        types = record.get("types", [record["type"]])
        assert len(types) == len(turns) // 2 == len(set(types)) and types[0] == record["type"]  # one turn per type
    assert all(len(record["conversations"]) == 2 for record in test)
    assert max(len(record["conversations"]) for record in train) >= 8  # up to 6 turns by default: 4 seen in 30
    assert len({r["id"] for r in train + test}) == 40

    def digest(record):
        return hashlib.sha256((out / record["image"]).read_bytes()).hexdigest()
    assert not {digest(r) for r in train} & {digest(r) for r in test}
    assert (out / "tokenizer.json").is_file()
    assert not [name for name in os.listdir(out) if ".tmp" in name]  # no leftovers from atomic writes

    # Same seed again: byte-identical files.
    again = tmp_path / "again"
    shapes.generate_dataset(str(again), 30, 10, seed=3, progress=False)
    assert (again / "train.json").read_bytes() == (out / "train.json").read_bytes()
    assert all(digest(r) == hashlib.sha256((again / r["image"]).read_bytes()).hexdigest() for r in test)


def test_cli_refuses_bad_input_with_one_line(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(SystemExit) as exit_info:
        shapes.main(["--out", str(tmp_path), "--train", "2", "--test", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--force" in error and "Traceback" not in error
    assert os.listdir(tmp_path) == ["keep.txt"]

    with pytest.raises(SystemExit) as exit_info:
        shapes.main(["--out", str(tmp_path / "new"), "--train", "-5"])
    assert exit_info.value.code == 2 and ">= 0" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        shapes.main(["--out", str(tmp_path / "new"), "--max-turns", "0"])
    assert exit_info.value.code == 2 and ">= 1" in capsys.readouterr().err

    for share in ("1.5", "nan", "half"):
        with pytest.raises(SystemExit) as exit_info:
            shapes.main(["--out", str(tmp_path / "new"), "--left-right-share", share])
        assert exit_info.value.code == 2 and "from 0 to 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        shapes.main(["--out", str(tmp_path / "new"), "--left-right-share", "0.5"])  # with the default --position half
    assert exit_info.value.code == 2 and "--position compare" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "new")

    shapes.main(["--out", str(tmp_path), "--train", "20", "--test", "1", "--force", "--max-turns", "1"])
    assert all(len(r["conversations"]) == 2 for r in json.loads((tmp_path / "train.json").read_text()))


def test_examples_folder_is_what_make_examples_draws(tmp_path, capsys):
    """examples/ is reproducible: tools/make_examples.py redraws every picture byte for byte, and each one shows
    what its name says (the README's example answers depend on it)."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("make_examples", os.path.join(root, "tools", "make_examples.py"))
    make_examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_examples)
    make_examples.main(str(tmp_path))
    assert capsys.readouterr().out.count("scene shapes-examples-") == len(make_examples.WANTED) == 5
    for name in make_examples.WANTED:
        assert (tmp_path / name).read_bytes() == open(os.path.join(root, "examples", name), "rb").read(), name


def load_tool(name):
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_position_probe_reads_the_column_and_nothing_else():
    """tools/probe_position.py (docs/demo-model.md): position vectors that encode the column give R² ~1 at the
    "+ position embedding" stage, ones that encode only the row give ~0 there (or below: a least-squares fit on few
    pictures does worse than the mean on new ones), whatever the patches show."""
    import torch
    import imp
    probe_position = load_tool("probe_position")
    model = imp.Imp.from_pretrained("checkpoints/demo", with_tokenizer=False).eval()
    size = model.config.vision.image_size
    cells = size // model.config.vision.patch_size  # 4 (56-px pictures in 14-px patches)
    direction = torch.randn(model.config.vision.hidden_size, generator=torch.Generator().manual_seed(0))
    index = torch.arange(cells * cells)
    with torch.no_grad():
        for encoded, expected in ((index % cells, (0.999, 1.0)), (index // cells, (-float("inf"), 0.1))):
            model.vision.position_embedding.weight.copy_(100 * encoded.float()[:, None] * direction)
            results = probe_position.probe(model, num_images=64)
            assert list(results)[:2] == ["patch embedding", "+ position embedding"]
            assert list(results)[-1] == "connector" and len(results) == 3 + len(model.vision.layers)
            for r_squared in results["+ position embedding"]:  # all patches, shape patches
                assert expected[0] <= r_squared <= expected[1], (encoded[:10].tolist(), results)
            assert results["patch embedding"][0] < 0.2  # what a patch shows says (almost) nothing about its column
        # The probe's stages are the model's own: its last two are what SigLIP.forward and encode_images return.
        pixel_values = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        stages = probe_position.image_path_stages(model, pixel_values)
        torch.testing.assert_close(stages[-2][1], model.vision(pixel_values), rtol=0, atol=0)
        torch.testing.assert_close(stages[-1][1], model.encode_images(pixel_values), rtol=0, atol=0)


def test_position_probe_command_line(capsys):
    probe_position = load_tool("probe_position")
    assert probe_position.main(["--images", "8"]) == 0
    out = capsys.readouterr().out
    assert "stage" in out and "+ position embedding" in out and "connector" in out
    assert probe_position.main(["--model", "no/such/folder"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_left_right_decoder_builds_what_it_says():
    """tools/left_right_decoder.py (docs/demo-model.md): its hand-made image tokens hold each patch's shape and
    colour where the scene puts them plus a clean column ramp, and the deciding answer token is the right word."""
    import torch
    import imp
    tool = load_tool("left_right_decoder")
    tokenizer = imp.load_tokenizer("checkpoints/demo")
    items = tool.left_right_scenes("test", 20)
    assert all(shapes.left_right_askable(scene) for scene, _, _ in items)
    assert {side for _, side, _ in items} == {"left", "right"}
    tokens = tool.HandMadeImageTokens(128, column_scale=1.0)
    scene = items[0][0]
    made = tokens(scene)  # (64, 128)
    columns = torch.arange(64) % 8
    ramp = ((columns.float() - 3.5) / 3.5)[:, None] * tokens.column_direction
    content = made - ramp  # what covers each patch, plus noise of std 0.1
    x0, y0, x1, y1 = scene[0]["box"]
    inside = (y0 // 14) * 8 + x0 // 14  # the first shape's top-left patch
    expected = tokens.shape_vectors[scene[0]["shape"]] + tokens.color_vectors[scene[0]["color"]]
    assert (content[inside] - expected).abs().max() < 0.6
    assert (content[63 if inside != 63 else 0] - expected).abs().max() > 1  # a patch elsewhere holds something else
    for item in items[:6]:
        for task in tool.TASKS:
            before, after, answer, deciding = tool.conversation(tokenizer, item, task)
            scene, side, _ = item
            word = tokenizer.decode([answer[deciding]]).strip()
            assert word == ((scene[0] if side == "left" else scene[1])["shape"] if task == "compare" else side)
    history = tool.run("side", steps=2, eval_every=1, num_train=16, num_test=10, log=lambda line: None)
    assert [step for step, _, _ in history] == [1, 2] and all(0 <= accuracy <= 1 for _, _, accuracy in history)
