#!/usr/bin/env python3
"""
probe_position.py: how much does each stage of a model's image path know about *where* a patch is?

    python tools/probe_position.py                          (the demo model, 200 fresh pictures: ~10 s)
    python tools/probe_position.py --model runs/m2 --images 400

A linear probe: for every stage of the image path (the patch embedding, + the position embeddings, each tower layer
Imp keeps, the connector) it fits a least-squares line from the stage's patch vectors to the patch's column (0 .. 3
on the demo's 4 x 4 grid, 0 .. 7 on the 8 x 8 grid of 112-px pictures) on half of the pictures, and reports R² on
the other half: 1.0 means the column can be read off the vectors linearly, 0.0 means not at all. Two columns of figures: over all patches, and over the patches a
shape covers (background patches differ only in where they are, so the first is mostly about the position vectors).

This is how the demo's history (docs/demo-model.md) found why an earlier demo (112-px pictures, 64 image tokens) answered
left/right questions at chance: the column was nearly absent from its image tokens. Pictures come from shapes.py
(grid layout, drawn at the model's own image size) on a seed stream of their own; the model must cut its pictures
into shapes.py's 14-px cells, as the demo configs do.
"""
import argparse
import os
import random
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)  # imp.py and shapes.py live one folder up

import torch  # noqa: E402

import imp  # noqa: E402
import shapes  # noqa: E402


def image_path_stages(model, pixel_values):
    """(name, (B, N, D) patch vectors) for each stage of Imp's image path, computed as SigLIP.forward does."""
    vision = model.vision
    x = vision.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D): what each patch shows
    stages = [("patch embedding", x)]
    x = x + vision.position_embedding.weight  # (B, N, D): + where it is
    stages.append(("+ position embedding", x))
    for index, layer in enumerate(vision.layers):
        x = layer(x)
        stages.append((f"tower layer {index}", x))
    stages.append(("connector", model.connector(x)))  # (B, N, C): the language model's image tokens
    return stages


def r_squared(vectors, targets):
    """Fit targets ~ vectors @ w + b on the first half of the rows, return R² on the second half."""
    design = torch.cat([vectors.double(), torch.ones(len(vectors), 1, dtype=torch.double)], dim=1)
    half = len(vectors) // 2
    solution = torch.linalg.lstsq(design[:half], targets[:half, None].double()).solution
    predicted = (design[half:] @ solution)[:, 0]
    truth = targets[half:].double()
    return float(1 - ((predicted - truth) ** 2).mean() / truth.var(unbiased=False))


@torch.no_grad()
def probe(model, num_images=200, seed=1):
    """{stage name: (R² over all patches, R² over shape patches)} for the column of each patch."""
    config = model.config.vision
    if config.patch_size != shapes.PATCH or config.image_size % shapes.PATCH or config.image_size < 56:
        raise ValueError(f"the probe draws shapes pictures on {shapes.PATCH}-px cells (56 px or more); this model takes "
                         f"{config.image_size}-px images in {config.patch_size}-px patches")
    cells = config.image_size // config.patch_size  # 4 for the demo (56 px), 8 at 112 px
    rng = random.Random(f"probe-position-{seed}")  # a stream of its own: not the training or test pictures
    pictures, covered = [], []  # covered: (B, N) True where a shape overlaps the patch
    for _ in range(num_images):
        image, scene = shapes.make_scene(rng, config.image_size)
        pictures.append(imp.preprocess_image(image, config.image_size))
        mask = torch.zeros(cells, cells, dtype=torch.bool)
        for item in scene:
            x0, y0, x1, y1 = item["box"]
            mask[y0 // shapes.PATCH:(y1 - 1) // shapes.PATCH + 1, x0 // shapes.PATCH:(x1 - 1) // shapes.PATCH + 1] = True
        covered.append(mask.flatten())
    pixel_values = torch.stack(pictures).to(model.vision.patch_embedding.weight.dtype)  # (B, 3, S, S)
    covered = torch.stack(covered)  # (B, N)
    columns = torch.arange(cells * cells).remainder(cells).float().expand(num_images, -1)  # (B, N): index % cells
    results = {}
    for name, vectors in image_path_stages(model, pixel_values):
        flat = vectors.float().reshape(-1, vectors.shape[-1])  # (B * N, D), picture by picture
        results[name] = (r_squared(flat, columns.reshape(-1)),
                         r_squared(flat[covered.reshape(-1)], columns[covered]))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Linear probe: can each stage of the image path tell which column a patch is in?",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python tools/probe_position.py\n"
               "  python tools/probe_position.py --model runs/m2 --images 400")
    parser.add_argument("--model", default=os.path.join(HERE, "checkpoints", "demo"),
                        help="an Imp folder with the demo's image size (default: checkpoints/demo)")
    parser.add_argument("--images", type=int, default=200, help="pictures to draw (default 200; half fit, half test)")
    parser.add_argument("--seed", type=int, default=1, help="picks the pictures (default 1)")
    args = parser.parse_args(argv)
    if args.images < 4:
        parser.error("--images must be at least 4")
    try:
        model = imp.Imp.from_pretrained(args.model, with_tokenizer=False).eval()
        results = probe(model, args.images, args.seed)
    except (imp.CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"R² of a linear probe for the patch column, {args.images} pictures ({args.model})")
    print(f"{'stage':24s} {'all patches':>12s} {'shape patches':>14s}")
    for name, (everywhere, on_shapes) in results.items():
        print(f"{name:24s} {everywhere:12.2f} {on_shapes:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
