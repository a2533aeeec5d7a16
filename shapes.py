"""
The synthetic "shapes" VQA dataset: the data our tiny demo model is trained on from scratch, on a laptop CPU.

Each image is a light background with 1 to 3 coloured shapes that never touch, each drawn on whole 14-px patch
cells (the "grid" layout, see make_scene; `--layout free` puts them anywhere). Each question about it has one exact
answer written as a fixed sentence, so "exact-answer accuracy" is simply string equality. The task is built for a
tiny ViT + Phi-2-style decoder trained from scratch in minutes on a laptop CPU: 4 very different colours, only two
sizes (10 and 24 px wide in 56-px pictures), no occlusion, and a vocabulary of a few dozen words. The questions still
come in several wordings, so the model has to read them and cannot guess from the image alone.

The output is in the LLaVA format that Imp's own training scripts use:
  captions.json  stage 1 (connector alignment): "<image>" -> one caption listing every shape, left to right, with
                 the half of the picture each is in (--no-caption-sides leaves the halves out)
  train.json     stage 2 (instruction tuning): 1 to 6 question/answer turns per image (--max-turns), one per type
  test.json      held out: images drawn from a different seed stream, one question each
Every scene comes from its own `random.Random`, seeded by (seed, split, index), so any single sample can be
rebuilt without generating the ones before it. The global RNG is never used.
"""
import argparse
import io
import json
import os
import random
import sys
import time
from collections import Counter

from PIL import Image, ImageDraw

from imp import SYSTEM_PROMPT

SHAPES = ("circle", "square", "triangle")
# Picked to be far apart in RGB, so a tiny ViT separates them with its first layer. The yellow is darkened a
# little so that it stands out from the light background.
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 195, 20)}
# The side of a shape's bounding box, as a fraction of the image side. The gap between the two ranges is large,
# so "small" and "large" are never ambiguous.
SIZES = {"small": (0.18, 0.22), "large": (0.34, 0.40)}
GAP = 4  # minimum pixels between any two shapes' boxes, and between a box and the image border

# Several wordings per question type, so the model has to read the question. Each type has exactly one answer
# template (in make_questions), so an answer is either exactly right or wrong.
PARAPHRASES = {
    "color": ["What color is the {shape}?", "What colour is the {shape}?", "Which color is the {shape}?",
              "Tell me the color of the {shape}."],
    "shape": ["What shape is the {color} object?", "Which shape is {color}?", "What is the shape of the {color} object?"],
    "count": ["How many shapes are there?", "How many objects are in the image?", "Count the shapes."],
    "exists": ["Is there a {color} {shape}?", "Does the image contain a {color} {shape}?", "Can you see a {color} {shape}?"],
    "position": ["Which shape is on the {side}?", "What shape is on the {side}?", "Which shape is further {side}?"],
    # --position half: which half of the picture one named shape is in (a lookup, like "What color is the circle?").
    "side": ["Is the {shape} on the left or on the right?", "Which side is the {shape} on?",
             "Is the {shape} on the left side or the right side?"],
    "size": ["Is the {shape} large or small?", "Is the {shape} small or large?", "How big is the {shape}?"],
}
TYPES = tuple(kind for kind in PARAPHRASES if kind != "side")  # "side" is asked as the "position" type
POSITION_STYLES = ("compare", "half")

# Imp's "phi2" conversation template (imp.SYSTEM_PROMPT). The tokenizer is trained on it as well, so that a whole
# prompt stays short.


LAYOUTS = ("grid", "free")
PATCH = 14  # the demo's vision patch size: the "grid" layout puts every shape on whole 14-px cells
# The demo's picture side: 4 x 4 cells of 14 px, so 16 image tokens. Fewer tokens make each training step cheaper
# (twice as many steps fit the demo's 20 minutes as at 112 px, 8 x 8 = 64 tokens) and leave the decoder fewer
# positions to search; docs/demo-model.md has the runs that chose it.
IMAGE_SIZE = 56


def make_scene(rng, image_size=IMAGE_SIZE, layout="grid"):
    """Draw one scene. Returns (PIL image, scene), where scene is a list of dicts, one per shape, sorted left to right.

    layout "grid" (the default, what the demo is trained on) puts each shape on a block of whole patch cells: small
    shapes on 1 cell, large ones on 2 x 2 (at 56 px; 2 x 2 and 3 x 3 at 112 px), drawn 2 px inside the block.
    Every patch of a circle then holds the same piece of a circle wherever the circle is, so a ViT's first layer (a
    linear map of one patch: imp.SigLIP.patch_embedding) can already tell a circle's edge from a square's corner.
    With "free" placement a small circle straddles several patches at any offset, and a from-scratch ViT of the
    demo's size needs many times the demo's 20 minutes to learn shapes that way (docs/demo-model.md).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    place = _place_on_grid if layout == "grid" else _place_shapes
    scene = None
    while scene is None:  # in the rare case that the shapes could not be packed apart, draw a new scene
        scene = place(rng, image_size)
    # Left to right; shapes in the same columns (common on the grid) top to bottom, so a caption has one order.
    scene.sort(key=lambda item: (item["x"], item["y"]))

    # A slightly tinted light background, and a little jitter on each colour, so that the model learns colour
    # categories rather than 4 exact RGB values.
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    for item in scene:
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[item["color"]])
        x0, y0, x1, y1 = item["box"]
        if item["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif item["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # an upward-pointing triangle that fills its box
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return image, scene


def _place_shapes(rng, image_size):
    """Pick 1 to 3 shapes and place them by rejection sampling. Returns None if one of them found no free spot."""
    scene = []
    for _ in range(rng.randint(1, 3)):
        size = rng.choice(tuple(SIZES))
        side = round(rng.uniform(*SIZES[size]) * image_size)
        for _attempt in range(50):  # drop the box anywhere inside the border and keep it if it touches nothing
            x0 = rng.randint(GAP, image_size - GAP - side)
            y0 = rng.randint(GAP, image_size - GAP - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(not _boxes_touch(box, other["box"]) for other in scene):
                break
        else:
            return None
        scene.append(dict(shape=rng.choice(SHAPES), color=rng.choice(tuple(COLORS)), size=size,
                          x=x0 + side / 2, y=y0 + side / 2, side=side, box=box))
    return scene


def _place_on_grid(rng, image_size):
    """Pick 1 to 3 shapes and put each on a free block of patch cells. Returns None if one found no free block."""
    cells = image_size // PATCH  # 4 at 56 px, 8 at 112 px; a partial last patch (e.g. at 64 px) is never used
    # Block sides in cells, about the "free" layout's 20% and 37% of the side: 1 and 2 cells at 56 px, 2 and 3 at 112.
    small = max(1, round(0.21 * cells))
    blocks = {"small": small, "large": max(small + 1, round(0.36 * cells))}
    inset = 2  # pixels between a block's edge and the drawing, so shapes in touching blocks stay GAP = 4 px apart
    taken, scene = set(), []
    for _ in range(rng.randint(1, 3)):
        size = rng.choice(tuple(SIZES))
        span = blocks[size]
        free = [(col, row) for col in range(cells - span + 1) for row in range(cells - span + 1)
                if not any((col + i, row + j) in taken for i in range(span) for j in range(span))]
        if not free:
            return None
        col, row = rng.choice(free)
        taken.update((col + i, row + j) for i in range(span) for j in range(span))
        x0, y0 = col * PATCH + inset, row * PATCH + inset
        side = span * PATCH - 2 * inset
        box = (x0, y0, x0 + side, y0 + side)
        scene.append(dict(shape=rng.choice(SHAPES), color=rng.choice(tuple(COLORS)), size=size,
                          x=x0 + side / 2, y=y0 + side / 2, side=side, box=box))
    return scene


def _boxes_touch(a, b):
    """True if boxes (x0, y0, x1, y1) overlap or come closer than GAP pixels."""
    return not (a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1])


def make_questions(rng, scene, position="half", image_size=IMAGE_SIZE):
    """One question per type that can be answered unambiguously for this scene, as dicts(type, question, answer).

    position "half" (the demo's) asks which half of the picture a named shape is in; "compare" asks which of two
    shapes is on the left (or right), a comparison that no demo-sized run learnt (docs/demo-model.md). Both
    are the "position" type."""
    if position not in POSITION_STYLES:
        raise ValueError(f"position must be one of {POSITION_STYLES}, got {position!r}")
    shape_counts = Counter(item["shape"] for item in scene)
    color_counts = Counter(item["color"] for item in scene)
    questions = []

    def ask(kind, answer, wording=None, **slots):
        questions.append(dict(type=kind, question=rng.choice(PARAPHRASES[wording or kind]).format(**slots),
                              answer=answer))

    # "the circle" only has a meaning if there is exactly one circle; the same goes for colours.
    unique_shapes = [item for item in scene if shape_counts[item["shape"]] == 1]
    unique_colors = [item for item in scene if color_counts[item["color"]] == 1]
    if unique_shapes:
        item = rng.choice(unique_shapes)
        ask("color", f"The {item['shape']} is {item['color']}.", shape=item["shape"])
    if unique_colors:
        item = rng.choice(unique_colors)
        ask("shape", f"It is a {item['shape']}.", color=item["color"])
    count = len(scene)
    ask("count", "There is 1 shape." if count == 1 else f"There are {count} shapes.")

    # Exists: a coin flip decides yes or no, so the answer can't be guessed from the prior. A "no" is usually a
    # near miss (one attribute of a real shape changed), which forces the model to bind colour to shape.
    present = {(item["color"], item["shape"]) for item in scene}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        answer = "Yes, there is."
    else:
        color, shape = rng.choice(scene)["color"], rng.choice(scene)["shape"]
        if rng.random() < 0.5:
            color = rng.choice(tuple(COLORS))
        else:
            shape = rng.choice(SHAPES)
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        if (color, shape) in present:
            color, shape = rng.choice(absent)
        answer = "No, there is not."
    ask("exists", answer, color=color, shape=shape)

    if position == "compare" and left_right_askable(scene):
        side = rng.choice(("left", "right"))
        item = scene[0] if side == "left" else scene[1]
        ask("position", f"The {item['shape']} is on the {side}.", side=side)
    if position == "half":
        one_sided = [item for item in unique_shapes if half_of(item, image_size)]
        if one_sided:
            item = rng.choice(one_sided)
            ask("position", f"The {item['shape']} is on the {half_of(item, image_size)}.", wording="side",
                shape=item["shape"])
    if unique_shapes:
        item = rng.choice(unique_shapes)
        ask("size", f"The {item['shape']} is {item['size']}.", shape=item["shape"])
    return questions


def left_right_askable(scene):
    """Left/right is asked only for two shapes of different types whose boxes do not share any column, so "on the
    left" can't be argued about. (The scene is sorted left to right.)"""
    return (len(scene) == 2 and scene[0]["shape"] != scene[1]["shape"]
            and scene[0]["box"][2] + GAP <= scene[1]["box"][0])


def half_of(item, image_size=IMAGE_SIZE):
    """'left' or 'right' if the shape's box lies wholly in that half of the picture, else None (it straddles the
    middle, and "which side is it on?" has no single answer)."""
    x0, _, x1, _ = item["box"]
    return "left" if x1 <= image_size / 2 else "right" if x0 >= image_size / 2 else None


def side_of(item, image_size=IMAGE_SIZE):
    """'on the left' or 'on the right' by the centre of the shape's box, 'in the middle' within 2 px of the centre."""
    offset = item["x"] - image_size / 2
    return "in the middle" if abs(offset) <= 2 else ("on the left" if offset < 0 else "on the right")


def caption(scene, sides=False, image_size=IMAGE_SIZE):
    """'A large red circle and a small blue triangle.' The shapes are listed left to right. With `sides`, each shape
    also says which half of the picture it is in: 'A large red circle on the left and a small blue triangle on the
    right.'"""
    parts = [f"a {item['size']} {item['color']} {item['shape']}" + (f" {side_of(item, image_size)}" if sides else "")
             for item in scene]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return listed[0].upper() + listed[1:] + "."


def _write_atomic(path, data):
    """Write to a temporary file next to `path`, then rename. Readers never see a half-written file."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def _write_json(path, records):
    _write_atomic(path, json.dumps(records, indent=1, ensure_ascii=False).encode("utf-8"))


def _make_split(out_dir, split, count, seed, image_size, progress, max_turns, layout, left_right_share=0.0,
                caption_sides=True, position="half"):
    """Generate one split: write its images and return (caption records, question records)."""
    captions, records = [], []
    start = time.time()
    for index in range(count):
        # Seeding with a string is deterministic in Python (it goes through sha512, not hash()), and the split
        # name in it keeps the train and test streams disjoint.
        rng = random.Random(f"shapes-{seed}-{split}-{index}")
        image, scene = make_scene(rng, image_size, layout)
        # --left-right-share: draw again (from the same stream) until the scene has a left/right question.
        if left_right_share and rng.random() < left_right_share:
            while not left_right_askable(scene):
                image, scene = make_scene(rng, image_size, layout)
        relative = f"images/{split}_{index:06d}.png"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        _write_atomic(os.path.join(out_dir, relative), buffer.getvalue())

        sample_id = f"{split}_{index:06d}"
        captions.append({"id": sample_id, "image": relative, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene, caption_sides, image_size)}]})
        candidates = make_questions(rng, scene, position, image_size)
        num_turns = min(len(candidates), rng.randint(1, max_turns))
        shuffled = rng.sample(candidates, len(candidates))
        if position == "compare":
            # Left/right can be asked about only ~13% of scenes (see make_questions). Picked at random it would be
            # ~2% of the data, too rare to learn, so whenever it is possible it goes first. (A "half" question can
            # be asked about most scenes: it takes its chances with the others.)
            shuffled.sort(key=lambda qa: qa["type"] != "position")  # a stable sort: the other turns stay shuffled
        turns = shuffled[:num_turns]
        conversations = []
        for turn, qa in enumerate(turns):
            # Only the first turn carries the image placeholder, as in LLaVA's multi-turn data.
            question = "<image>\n" + qa["question"] if turn == 0 else qa["question"]
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": qa["answer"]}]
        record = {"id": sample_id, "image": relative, "type": turns[0]["type"], "conversations": conversations}
        if len(turns) > 1:
            record["types"] = [qa["type"] for qa in turns]
        records.append(record)
        if progress and ((index + 1) % 2000 == 0 or index + 1 == count):
            print(f"{split}: {index + 1}/{count} images, {time.time() - start:.1f}s", flush=True)
    return captions, records


def generate_dataset(out_dir, num_train, num_test, seed=0, image_size=IMAGE_SIZE, progress=True, layout="grid",
                     max_turns=6, left_right_share=0.0, caption_sides=True, position="half"):
    """Write images/, captions.json, train.json and test.json under out_dir. Returns a summary dict."""
    if left_right_share and position != "compare":
        raise ValueError("left_right_share adds two-shape left/right questions: it needs position 'compare'")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    start = time.time()
    captions, train = _make_split(out_dir, "train", num_train, seed, image_size, progress, max_turns, layout,
                                  left_right_share, caption_sides, position)
    _, test = _make_split(out_dir, "test", num_test, seed, image_size, progress, 1, layout,  # one question each
                          position=position)
    _write_json(os.path.join(out_dir, "captions.json"), captions)
    _write_json(os.path.join(out_dir, "train.json"), train)
    _write_json(os.path.join(out_dir, "test.json"), test)

    def type_counts(records):
        return dict(sorted(Counter(t for r in records for t in r.get("types", [r["type"]])).items()))
    return {"out_dir": out_dir, "train_images": len(train), "test_images": len(test),
            "train_questions": sum(len(r["conversations"]) // 2 for r in train),
            "train_types": type_counts(train), "test_types": type_counts(test), "seconds": round(time.time() - start, 1)}


def corpus_texts(records):
    """The texts a tokenizer should learn from: every question, answer and caption, without the <image> tag."""
    for record in records:
        for message in record["conversations"]:
            text = message["value"].replace("<image>", "").strip()
            if text:
                # In the chat template a message usually follows a space ("ASSISTANT: Yes, ..."), and byte-level
                # BPE treats " Yes" and "Yes" as different words, so learn both forms.
                yield text
                yield " " + text


def train_tokenizer(texts, vocab_size=512, out_dir=None):
    """
    Train a GPT-2-style byte-level BPE, like Phi-2's but tiny. Token ids are laid out like this:
      0                  <|endoftext|>  pad / bos / unk, the role 50256 plays in Phi-2
      1 .. N-3           256 byte tokens, then the learned merges
      N-2, N-1           </s> (end of answer, eos) and <image> (placeholder), appended like Imp's added tokens
    N can come out below vocab_size: the shapes corpus has only a few dozen words, and the trainer stops once every
    word is a single token. Because </s> and <image> are "added special tokens", the tokenizer splits the text on
    them first, so each is always exactly one id and never merges with the text around it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Every training sample starts with the system prompt. Repeat it so that its words are frequent enough to be
    # merged into whole tokens, which makes every prompt much shorter.
    template = [f"{SYSTEM_PROMPT} USER: What is this? ASSISTANT: It is a circle."] * 1000
    tokenizer.train_from_iterator(_chain(texts, template), trainer=trainer)
    tokenizer.add_special_tokens(["</s>", "<image>"])
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        _write_atomic(os.path.join(out_dir, "tokenizer.json"), tokenizer.to_str(pretty=True).encode("utf-8"))
    return tokenizer


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:  # also rejects "nan"
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def _positive_int(text):
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _non_negative_int(text):
    if not text.isdigit():  # also rejects "-5"; argparse turns the exception into a one-line usage error
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Generate the synthetic shapes VQA dataset (LLaVA format) and, optionally, its tokenizer.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  python shapes.py --out data/shapes --train 20000 --test 500 --seed 0
  python shapes.py --out data/shapes --train 20000 --test 500 --tokenizer-out data/shapes
  python shapes.py --out data/shapes --tokenizer-only --tokenizer-out data/shapes   # reuse existing data
  python shapes.py --out /tmp/tiny --train 30 --test 10 --force""")
    parser.add_argument("--out", required=True, help="output folder (gets images/, captions.json, train.json, test.json)")
    parser.add_argument("--train", type=_non_negative_int, default=20000, help="number of training images (default 20000)")
    parser.add_argument("--test", type=_non_negative_int, default=500, help="number of held-out test images (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; the train and test streams are derived from it")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help=f"image side in pixels (default {IMAGE_SIZE} = 4x4 patches of 14, the demo's; 112 = 8x8)")
    parser.add_argument("--layout", choices=LAYOUTS, default="grid",
                        help="grid (default): shapes on whole 14-px patch cells; free: anywhere (much harder for a tiny ViT)")
    parser.add_argument("--max-turns", type=_positive_int, default=6,
                        help="each training image gets 1 to N question turns, one per question type (default 6)")
    parser.add_argument("--left-right-share", type=_fraction, default=0.0,
                        help="with --position compare, train split only: this fraction of pictures is drawn so that it "
                             "has a left/right question (default 0: ~13%% have one, as in the held-out split)")
    parser.add_argument("--position", choices=POSITION_STYLES, default="half",
                        help="position questions: half (default): 'Is the circle on the left or on the right?' about "
                             "one shape; compare: 'Which shape is on the left?' about two")
    parser.add_argument("--caption-sides", action=argparse.BooleanOptionalAction, default=True,
                        help="captions also name each shape's half of the picture ('... circle on the left and ...'; "
                             "default: on)")
    parser.add_argument("--force", action="store_true", help="write into --out even if it is not empty (files are overwritten)")
    parser.add_argument("--tokenizer-out", help="also train a byte-level BPE on the train texts and write DIR/tokenizer.json")
    parser.add_argument("--tokenizer-only", action="store_true", help="skip generation; train the tokenizer on --out's data")
    parser.add_argument("--vocab-size", type=int, default=512, help="largest tokenizer size, special tokens included (default 512)")
    args = parser.parse_args(argv)

    def fail(message):  # one clear line and exit code 2, like argparse, but without the usage block
        print(f"shapes.py: error: {message}", file=sys.stderr)
        sys.exit(2)

    if args.tokenizer_only:
        if not args.tokenizer_out:
            fail("--tokenizer-only needs --tokenizer-out DIR")
        records = []
        for name in ("captions.json", "train.json"):
            path = os.path.join(args.out, name)
            if not os.path.isfile(path):
                fail(f"{path} not found; generate the dataset first")
            with open(path, encoding="utf-8") as file:
                records += json.load(file)
    else:
        if args.left_right_share and args.position != "compare":
            fail("--left-right-share adds two-shape left/right questions: it needs --position compare")
        if args.image_size < 56:
            fail(f"--image-size must be at least 56 (room for 3 shapes), got {args.image_size}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            fail(f"--out {args.out} exists and is not a folder")
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
            fail(f"--out {args.out} is not empty; pass --force to overwrite")
        summary = generate_dataset(args.out, args.train, args.test, args.seed, args.image_size, layout=args.layout,
                                   max_turns=args.max_turns, left_right_share=args.left_right_share,
                                   caption_sides=args.caption_sides, position=args.position)
        print(json.dumps(summary, indent=1))
        with open(os.path.join(args.out, "captions.json"), encoding="utf-8") as file:
            records = json.load(file)
        with open(os.path.join(args.out, "train.json"), encoding="utf-8") as file:
            records += json.load(file)
    if args.tokenizer_out:
        tokenizer = train_tokenizer(corpus_texts(records), args.vocab_size, args.tokenizer_out)
        print(f"tokenizer: {tokenizer.get_vocab_size()} tokens -> {os.path.join(args.tokenizer_out, 'tokenizer.json')}")


if __name__ == "__main__":
    main()
