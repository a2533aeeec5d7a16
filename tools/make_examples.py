#!/usr/bin/env python3
"""
make_examples.py: redraw the five pictures in examples/ with shapes.py, from a seed stream never trained on.

    python tools/make_examples.py           (under a second)

Each picture is the first scene of the stream "shapes-examples-<index>" (index 0, 1, 2, ...) that fits its
description below, drawn exactly as shapes.py draws training images (56 px, grid layout). The training and test
splits use the streams "shapes-<seed>-train-<index>" and "shapes-<seed>-test-<index>", so these scenes are new to
the demo model. Files are written atomically.
"""
import io
import os
import random
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)  # shapes.py lives one folder up

import shapes  # noqa: E402


def kinds(scene):
    return sorted(item["shape"] for item in scene)


def has(scene, **attributes):
    return any(all(item[key] == value for key, value in attributes.items()) for item in scene)


# file name -> what its scene must show (the README's example questions are about these facts)
WANTED = {
    "three_squares.png": lambda s: kinds(s) == ["square"] * 3 and has(s, color="green"),
    "three_triangles.png": lambda s: kinds(s) == ["triangle"] * 3 and has(s, color="yellow"),
    "one_circle.png": lambda s: kinds(s) == ["circle"] and has(s, color="red", size="small"),
    "one_triangle.png": lambda s: kinds(s) == ["triangle"] and has(s, color="red", size="small"),
    "circle_and_square.png": lambda s: kinds(s) == ["circle", "square"] and has(s, shape="circle", color="blue")
    and has(s, shape="square", size="large"),
}


def main(folder=os.path.join(HERE, "examples")):
    os.makedirs(folder, exist_ok=True)
    for name, wanted in WANTED.items():
        index = 0
        while True:
            image, scene = shapes.make_scene(random.Random(f"shapes-examples-{index}"), shapes.IMAGE_SIZE)
            if wanted(scene):
                break
            index += 1
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        shapes._write_atomic(os.path.join(folder, name), buffer.getvalue())
        print(f"{os.path.join(folder, name)}: scene shapes-examples-{index}: {shapes.caption(scene)}")


if __name__ == "__main__":
    main()
