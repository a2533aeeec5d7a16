#!/usr/bin/env python3
"""
left_right_decoder.py: can the demo's language model learn left from right at all, if it is *given* where each
patch is? A controlled experiment without the vision tower.

    python tools/left_right_decoder.py                          (1500 steps, ~5 minutes on 2 cores)
    python tools/left_right_decoder.py --task side --steps 1200
    python tools/left_right_decoder.py --column-scale 0         (a control: no column in the tokens at all)

The image tokens are built by hand, one per patch of a shapes.py scene (112 px, 8 x 8 patches): a patch that a
shape covers gets that shape's vector plus its colour's vector, any other patch a background vector, and every patch
adds `--column-scale` times a fixed direction scaled from -1 (left column) to +1 (right column), plus a little noise.
So the column is in every token, cleanly and linearly (a probe would read it with R² ~1). A fresh Phi-2 of the
demo's size (train.py's "demo" text config: width 128, 4 layers, 2 heads) with the demo's tokenizer then learns a
single question type from these tokens, in the phi2 template, at the demo's stage-2 settings (batch 16, AdamW, peak lr
1e-3, cosine):
  --task compare   "Which shape is on the left?" -> "The circle is on the left."   (the demo's position question)
  --task side      "Is the circle on the left or on the right?" -> "The circle is on the left."   (one shape)
Every --eval-every steps it prints the loss and the held-out accuracy of the one answer token that decides (the
shape for compare, the side for side): 50% is a coin flip.

What it shows (docs/demo-model.md): the model sits at chance for a number of steps that is luck (seeds 2, 1
and 0: about 400, 550 and more than 1500), then learns the task within about a hundred. The demo's 20-minute recipe,
where left/right is one question type of six and the column has to be learnt by the tower as well, never gets there.
"""
import argparse
import math
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)  # imp.py, shapes.py and train.py live one folder up

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import imp  # noqa: E402
import shapes  # noqa: E402
import train  # noqa: E402

CELLS = 8  # 112-px pictures in 14-px patches
TASKS = ("compare", "side")


def left_right_scenes(stream, count):
    """`count` scenes that have a left/right question (two different shapes, no shared column), each with the side
    to ask about and a wording; a seed stream of their own, so train and test never share a scene."""
    found, index = [], 0
    while len(found) < count:
        rng = random.Random(f"left-right-decoder-{stream}-{index}")
        index += 1
        _, scene = shapes.make_scene(rng)
        if shapes.left_right_askable(scene):
            found.append((scene, rng.choice(("left", "right")), rng.choice(shapes.PARAPHRASES["position"])))
    return found


class HandMadeImageTokens:
    """The (64, width) image tokens of a scene: what covers each patch, plus where the patch is."""

    def __init__(self, width, column_scale, seed=0):
        generator = torch.Generator().manual_seed(seed)
        draw = lambda: torch.randn(width, generator=generator)  # noqa: E731: each vector has norm ~sqrt(width)
        self.shape_vectors = {name: draw() for name in shapes.SHAPES}
        self.color_vectors = {name: draw() for name in shapes.COLORS}
        self.background = draw()
        direction = draw()
        self.column_direction = direction / direction.norm() * math.sqrt(width)  # the same norm as the others
        self.column_scale = column_scale
        self.generator = generator

    def __call__(self, scene):
        tokens = self.background.repeat(CELLS * CELLS, 1)  # (64, width), patches in row-major order like SigLIP's
        for item in scene:
            x0, y0, x1, y1 = item["box"]
            for row in range(y0 // shapes.PATCH, (y1 - 1) // shapes.PATCH + 1):
                for column in range(x0 // shapes.PATCH, (x1 - 1) // shapes.PATCH + 1):
                    tokens[row * CELLS + column] = self.shape_vectors[item["shape"]] + self.color_vectors[item["color"]]
        columns = torch.arange(CELLS * CELLS).remainder(CELLS).float()  # (64,)
        ramp = (columns - (CELLS - 1) / 2) / ((CELLS - 1) / 2)  # -1 at the left edge .. +1 at the right edge
        tokens = tokens + self.column_scale * ramp[:, None] * self.column_direction
        return tokens + 0.1 * torch.randn(tokens.shape, generator=self.generator)


def conversation(tokenizer, item, task):
    """(ids before the image, ids after it, answer ids, index of the deciding answer token) in the phi2 template."""
    scene, side, wording = item
    target = scene[0] if side == "left" else scene[1]
    question = (wording.format(side=side) if task == "compare"
                else f"Is the {target['shape']} on the left or on the right?")
    before, after = imp.build_prompt(question).split(imp.IMAGE_PLACEHOLDER)  # the inference prompt, cut at <image>
    before, after = tokenizer.encode(before).ids, tokenizer.encode(after).ids
    answer = tokenizer.encode(f" The {target['shape']} is on the {side}.</s>").ids
    # The deciding token is the first one that differs from the answer with the other shape (compare) or side (side).
    other = (f" The {(scene[1] if side == 'left' else scene[0])['shape']} is on the {side}.</s>" if task == "compare"
             else f" The {target['shape']} is on the {'right' if side == 'left' else 'left'}.</s>")
    deciding = next(i for i, (a, b) in enumerate(zip(answer, tokenizer.encode(other).ids)) if a != b)
    return before, after, answer, deciding


def make_batch(model, tokenizer, image_tokens, items, task):
    """Right-padded input embeddings (B, T, C), labels (B, T) for the answers, and where each deciding token sits."""
    rows, labels, deciding = [], [], []
    for item in items:
        before, after, answer, decide = conversation(tokenizer, item, task)
        text = model.embed_tokens(torch.tensor(before + after + answer))  # (T - 64, C)
        rows.append(torch.cat([text[:len(before)], image_tokens(item[0]), text[len(before):]]))  # image after "USER: "
        start = len(before) + CELLS * CELLS + len(after)  # where the answer begins
        labels.append(torch.full((len(rows[-1]),), imp.IGNORE_INDEX))
        labels[-1][start:] = torch.tensor(answer)  # only the answer (and its </s>) is learnt, as in stage 2
        deciding.append((start + decide, answer[decide]))
    longest = max(len(row) for row in rows)
    embeddings = torch.stack([F.pad(row, (0, 0, 0, longest - len(row))) for row in rows])
    labels = torch.stack([F.pad(row, (0, longest - len(row)), value=imp.IGNORE_INDEX) for row in labels])
    return embeddings, labels, deciding


@torch.no_grad()
def accuracy(model, tokenizer, image_tokens, items, task):
    """Held-out share of answers whose deciding token is the model's top choice (teacher-forced up to it)."""
    model.eval()
    right = 0
    for first in range(0, len(items), 50):
        embeddings, _, deciding = make_batch(model, tokenizer, image_tokens, items[first:first + 50], task)
        logits = model(inputs_embeds=embeddings)  # (B, T, vocab): position t predicts token t + 1
        right += sum(int(logits[row, position - 1].argmax()) == token for row, (position, token) in enumerate(deciding))
    model.train()
    return right / len(items)


def run(task="compare", steps=1500, column_scale=1.0, batch_size=16, lr=1e-3, eval_every=100, num_train=4000,
        num_test=300, seed=0, tokenizer_folder=None, log=lambda line: print(line, flush=True)):
    """Train and report; returns [(step, loss, held-out accuracy)] at every evaluation."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    tokenizer = imp.load_tokenizer(tokenizer_folder or os.path.join(HERE, "checkpoints", "demo"))
    torch.manual_seed(seed)
    spec = train.NAMED_CONFIGS["demo"]["text"]
    model = imp.Phi2(imp.PhiConfig(vocab_size=tokenizer.get_vocab_size(), **spec))
    train.init_weights(model)
    image_tokens = HandMadeImageTokens(model.config.hidden_size, column_scale, seed)
    train_items, test_items = left_right_scenes("train", num_train), left_right_scenes("test", num_test)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    history, started = [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:  # the demo's schedule: 3% warmup, then cosine
            group["lr"] = train.get_lr(step, steps, math.ceil(0.03 * steps), lr)
        embeddings, labels, _ = make_batch(model, tokenizer, image_tokens,
                                           [order.choice(train_items) for _ in range(batch_size)], task)
        logits = model(inputs_embeds=embeddings)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=imp.IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            history.append((step + 1, loss.item(), accuracy(model, tokenizer, image_tokens, test_items, task)))
            log(f"step {step + 1:5d} | loss {history[-1][1]:.4f} | held-out {history[-1][2]:6.1%} | "
                f"{time.time() - started:.0f} s")
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Can the demo-sized decoder learn left/right from image tokens that carry each patch's column?",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python tools/left_right_decoder.py\n"
               "  python tools/left_right_decoder.py --task side --steps 1200\n"
               "  python tools/left_right_decoder.py --column-scale 0   # a control: no column in the tokens")
    parser.add_argument("--task", choices=TASKS, default="compare",
                        help="compare: 'Which shape is on the left?' (default); side: 'Is the circle on the left or right?'")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    parser.add_argument("--column-scale", type=float, default=1.0,
                        help="strength of the column signal, 1 = as strong as a shape's vector (default 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3, the demo's)")
    parser.add_argument("--eval-every", type=int, default=100, help="report every N steps (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="init, token vectors and batch order (default 0)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.task, args.steps, args.column_scale, lr=args.lr, eval_every=args.eval_every, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
