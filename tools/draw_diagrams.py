#!/usr/bin/env python3
"""
draw_diagrams.py: the four teaching diagrams of README.md's course, drawn with pillow only.

    python tools/draw_diagrams.py                 (writes docs/*.png, about a second)
    python tools/draw_diagrams.py --out /tmp/d    (somewhere else, e.g. to compare)

writes
    docs/architecture.png   image -> patches -> ViT -> connector -> splice -> Phi-2, with Imp-3B's sizes
    docs/kv-cache.png       the KV cache across prefill (every prompt position at once) and two decode steps
    docs/lora.png           y = W x + (alpha / r) B A x, and what merge() folds into W
    docs/int4-group.png     one group of 32 weights: its scale, its 4-bit codes, the bytes they are packed into

Every number drawn comes from the code: the sizes from imp.py's configs, the int4 group from quant.quantize_int4
on a fixed, seeded group. The pictures are deterministic (no clock, no system font: pillow's own font), so that
tests/test_diagrams.py can redraw them and compare the bytes with the committed files.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)  # imp.py and quant.py live one folder up

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import imp  # noqa: E402
import quant  # noqa: E402

INK, GREY, LIGHT, WHITE = (25, 25, 25), (120, 120, 120), (232, 232, 232), (255, 255, 255)
BLUE, ORANGE, GREEN, RED, PURPLE = (66, 110, 190), (230, 140, 40), (70, 150, 80), (200, 60, 50), (130, 80, 170)
PALE_BLUE, PALE_ORANGE, PALE_GREEN = (208, 222, 245), (250, 226, 196), (212, 236, 214)


def font(size: int):
    """pillow's bundled font: the same glyphs on every machine (a system font path would not be)."""
    return ImageFont.load_default(size=size)


def canvas(width: int, height: int):
    picture = Image.new("RGB", (width, height), WHITE)
    return picture, ImageDraw.Draw(picture)


def centred_text(draw, box, lines, size=15, fill=INK):
    """Lines of text centred in box (x0, y0, x1, y1)."""
    text_font = font(size)
    line_height = size + 4
    y = (box[1] + box[3]) / 2 - line_height * len(lines) / 2 + 2
    for line in lines:
        x = (box[0] + box[2]) / 2 - draw.textlength(line, font=text_font) / 2
        draw.text((round(x), round(y)), line, fill=fill, font=text_font)
        y += line_height


def box(draw, xy, lines, fill=LIGHT, outline=INK, size=15):
    draw.rounded_rectangle(xy, radius=8, fill=fill, outline=outline, width=2)
    centred_text(draw, xy, lines, size)


def arrow(draw, start, end, colour=INK, width=2):
    """A straight arrow with a filled head at `end` (horizontal or vertical)."""
    draw.line([start, end], fill=colour, width=width)
    (x0, y0), (x1, y1) = start, end
    head = 8
    if abs(x1 - x0) >= abs(y1 - y0):
        sign = 1 if x1 > x0 else -1
        points = [(x1, y1), (x1 - sign * head, y1 - head / 2), (x1 - sign * head, y1 + head / 2)]
    else:
        sign = 1 if y1 > y0 else -1
        points = [(x1, y1), (x1 - head / 2, y1 - sign * head), (x1 + head / 2, y1 - sign * head)]
    draw.polygon(points, fill=colour)


def label(draw, xy, text, size=14, fill=INK):
    draw.text(xy, text, fill=fill, font=font(size))


# ----------------------------------------------------------------------------------------------------------------
# 1. The architecture.


def toy_picture(side: int) -> Image.Image:
    """A picture like the demo's: a red circle and a blue square on grey."""
    picture, draw = canvas(side, side)
    draw.rectangle([0, 0, side, side], fill=(200, 200, 200))
    draw.ellipse([side * 0.12, side * 0.15, side * 0.48, side * 0.51], fill=RED)
    draw.rectangle([side * 0.55, side * 0.5, side * 0.88, side * 0.83], fill=BLUE)
    return picture


def architecture() -> Image.Image:
    config = imp.ImpConfig()  # Imp-3B's defaults
    vision, text = config.vision, config.text
    side = vision.image_size // vision.patch_size
    picture, draw = canvas(1120, 440)
    label(draw, (20, 12), "Imp-3B: one question about one picture (sizes from imp.py's ImpConfig)", 18)

    # the picture, then the same picture cut into patches
    photo = toy_picture(120)
    picture.paste(photo, (20, 80))
    label(draw, (20, 206), "picture", 14)
    label(draw, (20, 224), f"{vision.image_size} x {vision.image_size} px", 13, GREY)
    arrow(draw, (146, 140), (180, 140))
    picture.paste(photo, (185, 80))
    cells = 6  # drawn as 6 x 6; the real grid is 27 x 27
    for i in range(1, cells):
        draw.line([(185 + i * 20, 80), (185 + i * 20, 200)], fill=WHITE, width=2)
        draw.line([(185, 80 + i * 20), (305, 80 + i * 20)], fill=WHITE, width=2)
    label(draw, (185, 206), "patches", 14)
    label(draw, (185, 224), f"{side} x {side} = {vision.num_patches}", 13, GREY)
    label(draw, (185, 240), f"of {vision.patch_size} x {vision.patch_size} px", 13, GREY)

    arrow(draw, (312, 140), (345, 140))
    box(draw, (350, 85, 500, 195), ["SigLIP ViT", f"{vision.num_layers_kept} of {vision.num_hidden_layers} layers",
                                    f"width {vision.hidden_size}"], PALE_BLUE)
    arrow(draw, (500, 140), (535, 140))
    box(draw, (540, 85, 690, 195), ["connector", "Linear, GELU,", "Linear",
                                    f"{vision.hidden_size} -> {text.hidden_size}"], PALE_ORANGE)
    label(draw, (350, 206), f"({vision.num_patches}, {vision.hidden_size})", 13, GREY)
    label(draw, (540, 206), f"({vision.num_patches}, {text.hidden_size})", 13, GREY)
    label(draw, (540, 222), "image tokens", 13, GREY)

    # the prompt: text tokens, with the one <image> token replaced by the image tokens
    top = 290
    label(draw, (20, top + 58), "splice: the prompt's one <image> token becomes the image tokens", 15)
    x = 20
    for word in ["system", "USER:"]:
        width = draw.textlength(word, font=font(13)) + 14
        box(draw, (x, top, x + width, top + 30), [word], PALE_GREEN, size=13)
        x += width + 4
    image_start = x
    for i in range(14):
        colour = ORANGE if i != 10 else WHITE
        if i == 10:
            centred_text(draw, (x, top, x + 18, top + 30), ["..."], 13)
        else:
            draw.rectangle([x, top + 4, x + 14, top + 26], fill=colour, outline=INK)
        x += 18
    image_end = x
    for word in ["What", "shape", "...", "ASSISTANT:"]:
        width = draw.textlength(word, font=font(13)) + 14
        box(draw, (x, top, x + width, top + 30), [word], PALE_GREEN, size=13)
        x += width + 4
    draw.line([(image_start, top + 36), (image_end - 4, top + 36)], fill=ORANGE, width=3)
    label(draw, (image_start, top + 40), f"{vision.num_patches} image tokens", 13, GREY)
    middle_of_image = (image_start + image_end) // 2  # from the connector down into the prompt row
    draw.line([(615, 242), (615, 258), (middle_of_image, 258)], fill=GREY, width=2)
    arrow(draw, (middle_of_image, 258), (middle_of_image, top - 4), GREY)

    arrow(draw, (x + 6, top + 15), (x + 40, top + 15))
    phi_box = (x + 45, top - 45, x + 215, top + 75)
    box(draw, phi_box, ["Phi-2", f"{text.num_hidden_layers} blocks, width {text.hidden_size}",
                        f"{text.num_attention_heads} heads", "next-token logits"], PALE_BLUE)
    arrow(draw, (phi_box[2], top + 15), (phi_box[2] + 30, top + 15))
    label(draw, (phi_box[2] + 34, top + 6), "\"It is", 15)
    label(draw, (phi_box[2] + 34, top + 24), "a circle.\"", 15)
    label(draw, (20, 404), "The vision tower never sees the question; every picture costs "
                           f"{vision.num_patches} positions of Phi-2's context.", 14, GREY)
    return picture


# ----------------------------------------------------------------------------------------------------------------
# 2. The KV cache.


def cache_row(draw, left, top, filled, written, reading, length, cell=34):
    """One layer's cache: `length` preallocated slots; `filled` hold keys and values from before, `written` are
    written now, and the new queries read slots 0 .. reading - 1."""
    for slot in range(length):
        x = left + slot * cell
        if slot in written:
            fill = ORANGE
        elif slot < filled:
            fill = PALE_BLUE
        else:
            fill = WHITE
        draw.rectangle([x, top, x + cell - 4, top + 30], fill=fill, outline=INK if slot < reading else GREY)
        centred_text(draw, (x, top, x + cell - 4, top + 30), [str(slot)], 12, INK if slot < reading else GREY)


def kv_cache() -> Image.Image:
    picture, draw = canvas(1060, 470)
    label(draw, (20, 12), "The KV cache: keys and values of every position, kept per layer (imp.KVCache)", 18)
    prompt, length, left = 6, 12, 430
    rows = [("prefill(embeddings, cache)", f"{prompt} positions in one pass: all {prompt} written,",
             "each query reads the keys up to its own position", 0, set(range(prompt)), prompt),
            ("decode_step(token, 6, cache)", "one new position: its key and value written,",
             "its one query reads all 7 keys", prompt, {prompt}, prompt + 1),
            ("decode_step(token, 7, cache)", "and again: one position's work per token,",
             "reading every key before it; nothing is recomputed", prompt + 1, {prompt + 1}, prompt + 2)]
    for index, (title, line1, line2, filled, written, reading) in enumerate(rows):
        top = 70 + index * 110
        label(draw, (20, top), title, 16)
        label(draw, (20, top + 24), line1, 13, GREY)
        label(draw, (20, top + 42), line2, 13, GREY)
        cache_row(draw, left, top, filled, written, reading, length)
        label(draw, (left, top + 36), "one layer's keys and values: (B, heads, max_length, head_dim)", 13, GREY)
    legend_top = 410
    for x, fill, text in ((20, PALE_BLUE, "kept from before"), (220, ORANGE, "written in this call"),
                          (440, WHITE, "empty (preallocated to prompt + max_new_tokens)")):
        draw.rectangle([x, legend_top, x + 24, legend_top + 18], fill=fill, outline=INK)
        label(draw, (x + 32, legend_top + 2), text, 13)
    label(draw, (20, legend_top + 30), "Dark outline: the keys this call's queries attend to. Paper eq. (1): "
                                       "T_total = T_VE + prefill + decode.", 13, GREY)
    return picture


# ----------------------------------------------------------------------------------------------------------------
# 3. LoRA.


def lora() -> Image.Image:
    picture, draw = canvas(1000, 400)
    label(draw, (20, 12), "LoRA (imp.LoRALinear): y = W x + b + (alpha / r) B (A x)", 18)
    d_in, d_out, rank = 8, 8, 2  # drawn sizes; Imp-3B's stage 2: d = 2560, r = 256, alpha = 256
    unit = 18
    # x
    x_left, x_top = 30, 90
    for i in range(d_in):
        draw.rectangle([x_left, x_top + i * unit, x_left + unit, x_top + (i + 1) * unit], fill=PALE_GREEN, outline=INK)
    label(draw, (x_left - 4, x_top + d_in * unit + 6), "x (d_in)", 13)
    # W, frozen
    w_left, w_top = 150, 90
    draw.rectangle([w_left, w_top, w_left + d_in * unit, w_top + d_out * unit], fill=LIGHT, outline=INK, width=2)
    centred_text(draw, (w_left, w_top, w_left + d_in * unit, w_top + d_out * unit), ["W", "frozen", "d_out x d_in"], 14)
    arrow(draw, (x_left + unit + 6, x_top + 40), (w_left - 6, w_top + 40))
    # A and B, trained
    a_left, a_top = 150, 280
    draw.rectangle([a_left, a_top, a_left + d_in * unit, a_top + rank * unit], fill=PALE_ORANGE, outline=INK, width=2)
    label(draw, (a_left + d_in * unit + 8, a_top + 6), "A: r x d_in, random", 13)
    b_left, b_top = 430, 230
    draw.rectangle([b_left, b_top, b_left + rank * unit, b_top + d_out * unit], fill=PALE_ORANGE, outline=INK, width=2)
    label(draw, (b_left + rank * unit + 8, b_top + 4), "B: d_out x r", 13)
    label(draw, (b_left + rank * unit + 8, b_top + 22), "starts at zero,", 13)
    label(draw, (b_left + rank * unit + 8, b_top + 40), "so training starts", 13)
    label(draw, (b_left + rank * unit + 8, b_top + 58), "from the base model", 13)
    arrow(draw, (x_left + unit + 6, x_top + 120), (a_left - 6, a_top + 10))
    arrow(draw, (a_left + d_in * unit + 4, a_top + rank * unit + 10), (b_left - 6, a_top + rank * unit + 10))
    label(draw, (a_left + 40, a_top + rank * unit + 14), "r numbers per token", 13, GREY)
    # the sum
    plus_x, plus_y = 700, 160
    draw.ellipse([plus_x - 16, plus_y - 16, plus_x + 16, plus_y + 16], outline=INK, width=2)
    centred_text(draw, (plus_x - 16, plus_y - 16, plus_x + 16, plus_y + 16), ["+"], 20)
    arrow(draw, (w_left + d_in * unit + 6, plus_y), (plus_x - 20, plus_y))
    arrow(draw, (b_left + rank * unit // 2, b_top - 4), (plus_x - 12, plus_y + 14), ORANGE)
    label(draw, (560, 200), "x alpha / r", 14, ORANGE)
    arrow(draw, (plus_x + 18, plus_y), (plus_x + 70, plus_y))
    label(draw, (plus_x + 76, plus_y - 8), "y (d_out)", 14)
    label(draw, (620, 300), "merge():   W <- W + (alpha / r) B A", 15)
    label(draw, (620, 322), "unmerge(): W <- W - (alpha / r) B A", 15)
    label(draw, (620, 350), "trained: r (d_in + d_out) instead of d_in d_out", 13, GREY)
    label(draw, (620, 368), "Imp-3B: r = alpha = 256 on every Linear of Phi-2", 13, GREY)
    return picture


# ----------------------------------------------------------------------------------------------------------------
# 4. One int4 group.


def int4_group() -> Image.Image:
    group_size = 32  # quant.DEFAULT_GROUP_SIZE
    generator = torch.Generator().manual_seed(3)
    weights = torch.randn(1, group_size, generator=generator) * 0.02  # one row of one group, Phi-2-like magnitudes
    qweight, scales = quant.quantize_int4(weights, group_size, "symmetric")
    codes = quant.unpack_int4(qweight)[0].tolist()
    scale = float(scales[0, 0])
    decoded = quant.dequantize_int4(qweight, scales, None, group_size, group_size)[0].tolist()
    values = weights[0].tolist()
    extreme = max(range(group_size), key=lambda i: abs(values[i]))

    picture, draw = canvas(1100, 520)
    label(draw, (20, 12), f"One int4 group (quant.quantize_int4, symmetric, G = {group_size}): "
                          "32 weights share one float16 scale", 18)
    left, middle, column = 70, 200, 30
    pixels_per_unit = 110 / abs(values[extreme])  # the largest weight is 110 px tall
    draw.line([(left - 10, middle), (left + group_size * column, middle)], fill=GREY)
    for step in range(-8, 8):  # the 16 levels (q - 8) * scale, q = 0 .. 15
        y = middle - step * scale * pixels_per_unit
        draw.line([(left - 10, y), (left + group_size * column, y)], fill=LIGHT)
    label(draw, (left - 60, middle - 8), "0", 12, GREY)
    for i, (value, code, back) in enumerate(zip(values, codes, decoded)):
        x = left + i * column
        colour = RED if i == extreme else BLUE
        draw.rectangle([x + 6, min(middle, middle - value * pixels_per_unit), x + column - 6,
                        max(middle, middle - value * pixels_per_unit)], fill=colour)
        y = middle - back * pixels_per_unit
        draw.ellipse([x + column / 2 - 4, y - 4, x + column / 2 + 4, y + 4], outline=ORANGE, width=2)
        centred_text(draw, (x, 340, x + column, 360), [str(code)], 13)
    label(draw, (20, 342), "code", 13)
    label(draw, (left, 366), "bars: the weights w (red: the largest |w|, m = "
                             f"{values[extreme]:+.5f});   rings: what the codes decode to, (q - 8) x scale", 13)
    label(draw, (left, 386), f"scale = m / -8 = {scale:+.6f} (float16, rounded to 8 significant bits);   "
                             "q = clamp(round(w / scale), -8, 7) + 8, so m gets code 0", 13)
    # the bytes
    top = 430
    label(draw, (20, top - 6), "bytes", 13)
    for j in range(8):  # the first 8 bytes of the row: columns 2j (low nibble) and 2j + 1 (high nibble)
        x = left + j * 2 * column
        low, high = codes[2 * j], codes[2 * j + 1]
        draw.rectangle([x + 2, top - 8, x + 2 * column - 2, top + 18], fill=PALE_ORANGE, outline=INK)
        centred_text(draw, (x, top - 8, x + 2 * column, top + 18), [f"0x{high:X}{low:X}"], 13)
    label(draw, (left + 16 * column + 10, top - 6), "... 16 bytes per group: byte j holds column 2j in its low 4 bits,",
          13)
    label(draw, (left + 16 * column + 10, top + 12), "column 2j + 1 in its high 4 bits (quant.pack_int4)", 13)
    label(draw, (20, 480), f"Storage: 32 x 4 bits + a 16-bit scale = {4 + 16 / group_size:.1f} bits per weight "
                           "(docs/quantization.md has the whole format).", 13, GREY)
    return picture


DIAGRAMS = {"architecture.png": architecture, "kv-cache.png": kv_cache, "lora.png": lora,
            "int4-group.png": int4_group}


def save(picture: Image.Image, path: str):
    """Atomically, and without metadata that could change from run to run."""
    temporary = f"{path}.tmp{os.getpid()}"
    picture.save(temporary, format="PNG", optimize=False, compress_level=9)
    os.replace(temporary, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw README.md's four teaching diagrams with pillow.",
                                     epilog="examples:\n  python tools/draw_diagrams.py\n"
                                            "  python tools/draw_diagrams.py --out /tmp/diagrams",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "docs"), help="output folder (default: docs/)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"draw_diagrams.py: error: --out {args.out} is a file, not a folder", file=sys.stderr)
        sys.exit(2)
    os.makedirs(args.out, exist_ok=True)
    for name, draw_it in DIAGRAMS.items():
        target = os.path.join(args.out, name)
        save(draw_it(), target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
