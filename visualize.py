"""
visualize.py: the pictures nanoImp draws, with pillow only (no plotting library).

    attention heat map   which image patches the answer looked at   infer.py --attention-map where.png IMAGE QUESTION
    loss curve           loss and learning rate from log.jsonl      train.py (at the end of a run), train.py --plot-log

tools/make_figures.py puts the README's figures together from these two.
"""
import json
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import imp


class PictureError(ValueError):
    """Something the user can fix (an empty log, an output name pillow cannot write): one line, no traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Attention heat maps: how much the answer's tokens attended to each image patch.
#
# In Imp the image is nothing but N extra "words" in the prompt (paper section 3: the connector's outputs are
# concatenated with the text tokens), so the decoder's own attention probabilities already say how much each answer
# token took from each patch. We average them plainly:
#   - over every layer: which layers read the image differs from model to model and from question to question, and
#     picking some would be a choice the reader cannot see;
#   - over every head: heads specialise (some look at the image, some at the previous word, many park their
#     attention on the first token, an "attention sink", Xiao et al. 2023), and the mean shows where the rows look
#     overall, without choosing heads by their result;
#   - over every answer token, each counted once.
# The values stay probabilities (each row of a softmax sums to 1 over all positions, text included), so the sum of
# the grid is the share of attention the answer gave to the image at all. Attention is where the model read from,
# not proof of why it answered (Jain and Wallace 2019, "Attention is not Explanation"): a teaching picture.


def answer_attention(model: imp.Imp, input_ids, pixel_values, answer_ids) -> tuple:
    """The mean attention of the answer on each image patch.

    input_ids (1, T): the prompt, with one <image>; pixel_values (1, 3, S, S); answer_ids: the answer's token ids
    (generated, or any others). Returns (grid, share): grid (g, g) float32 with g = S / patch size (27 for Imp-3B,
    patches in SigLIP's row-major order), grid[r, c] = mean over layers, heads and answer rows of the probability
    given to patch (r, c); share = grid.sum(), the fraction of the answer's attention that went to the image.
    """
    image_columns = image_positions(model, input_ids)  # (num_images, N) positions in the spliced sequence
    if image_columns.shape[0] != 1:
        raise PictureError(f"an attention map needs a prompt with exactly one image (this one has "
                           f"{image_columns.shape[0]})")
    image_columns = image_columns[0]  # (N,)
    prompt_length = input_ids.shape[1] - 1 + len(image_columns)  # spliced: the <image> id became N positions
    # Position t's output row chooses token t + 1, so answer token k (0-based) was chosen by row prompt_length-1+k:
    # the first by the prompt's last position ("ASSISTANT:"), the last by the answer's second-to-last token. An
    # empty answer still has one row: the one that chose to stop at once.
    rows = list(range(prompt_length - 1, prompt_length - 1 + max(len(answer_ids), 1)))
    answer = torch.tensor([list(answer_ids)], dtype=input_ids.dtype, device=input_ids.device).view(1, -1)
    sequence = torch.cat([input_ids, answer], dim=1)  # (1, T + A): prompt and answer, one forward pass
    probabilities = attention_maps(model, sequence, pixel_values, rows)  # (L, H, R, T + A - 1 + N)
    on_image = probabilities[..., image_columns]  # (L, H, R, N): the columns of the image patches only
    per_patch = on_image.mean(dim=(0, 1, 2))  # (N,)
    side = model.config.vision.image_size // model.config.vision.patch_size
    return per_patch.view(side, side).cpu(), per_patch.sum().item()


def image_positions(model: imp.Imp, input_ids) -> torch.Tensor:
    """Where Imp.splice puts the image patches, for one prompt (1, T): (num_images, N) positions in the spliced
    sequence. The <image> id at token position p becomes patches p .. p+N-1, so every later token moves N - 1
    to the right. Patch i of a row is the i-th patch of SigLIP's grid in row-major order."""
    num_patches = model.config.vision.num_patches
    placeholders = model.is_image(input_ids[0]).nonzero().flatten().tolist()  # token positions of the <image> ids
    starts = [position + i * (num_patches - 1) for i, position in enumerate(placeholders)]  # i earlier images
    return torch.tensor([list(range(start, start + num_patches)) for start in starts],
                        dtype=torch.long).view(-1, num_patches)  # (num_images, N)


@torch.inference_mode()
def attention_maps(model: imp.Imp, input_ids, pixel_values=None, rows=None) -> torch.Tensor:
    """The attention probabilities of every Phi-2 layer for one sequence (1, T) (a prompt, and an answer after
    it): one forward pass without a cache, as in training. A forward hook on each layer's attention recomputes its
    queries and keys from the layer's input (PhiAttention.project) and keeps the softmax of the query positions
    `rows` only (a list; default all), so that Imp-3B's 32 layers x 32 heads x ~800 x ~800 probabilities (2.6 GB)
    never exist at once.
    -> (layers, heads, len(rows), T') float32: [l, h, r, j] = how much query rows[r] takes from position j."""
    kept = []

    def keep(attention, inputs, output):  # inputs: PhiAttention.forward's (x, rotary, start, cache)
        q, k, _ = attention.project(inputs[0], inputs[1])
        window = getattr(attention.config, "sliding_window", None)  # Phi-3 (Imp-4B) only
        probabilities = imp.attention_probabilities(q, k, causal=True, window=window)[0]  # (H, T', T')
        kept.append(probabilities if rows is None else probabilities[:, rows])
    hooks = [block.self_attn.register_forward_hook(keep) for block in model.llm.layers]
    try:
        model.llm(inputs_embeds=model.embed(input_ids, pixel_values), last_only=True)  # only the hooks' catch counts
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(kept)  # (L, H, R, T')


def heat_colours() -> list:
    """A 256-entry palette (dark purple -> red -> orange -> pale yellow, like matplotlib's "inferno"), flattened
    for Image.putpalette. Brightness rises steadily along it, so it reads correctly in grey too."""
    anchors = np.array([(0, 0, 4), (66, 10, 104), (147, 38, 103), (221, 81, 58), (252, 165, 10), (252, 255, 164)],
                       dtype=np.float64)
    where = np.linspace(0, len(anchors) - 1, 256)
    channels = [np.interp(where, np.arange(len(anchors)), anchors[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8).flatten().tolist()


def heat_map_picture(image: Image.Image, grid: torch.Tensor, aspect: str = "square", opacity: float = 0.6):
    """Blend a (g, g) grid over `image` as it is displayed (upright), at the image's own size.

    The grid is mapped back the way the model saw the picture: with "square" the image was squashed to a square,
    so each cell stretches back over (W / g) x (H / g) pixels; with "pad" it was centred on a grey square first, so
    the grid covers that square and the padding is cropped away again. Cells are kept sharp (nearest-neighbour):
    each one is exactly one image token, and smoothing would suggest a resolution the model does not have.
    The colours run from the grid's 0 to its maximum; the image underneath is turned grey, so that every colour in
    the picture is the heat map's.
    """
    rgb = imp.to_rgb(image)
    width, height = rgb.size
    values = grid.float().numpy()
    top = values.max()
    levels = np.rint(255 * values / top).astype(np.uint8) if top > 0 else np.zeros(values.shape, np.uint8)
    heat = Image.fromarray(levels)  # (g, g) uint8: a grey "L" image, one pixel per patch
    if aspect == "pad":
        side = max(width, height)
        left, upper = (side - width) // 2, (side - height) // 2  # where imp.expand_to_square pasted the image
        heat = heat.resize((side, side), Image.NEAREST).crop((left, upper, left + width, upper + height))
    else:
        heat = heat.resize((width, height), Image.NEAREST)
    heat.putpalette(heat_colours())  # "L" -> "P": each level looks up its colour
    grey = rgb.convert("L").convert("RGB")
    return Image.blend(grey, heat.convert("RGB"), opacity)


def save_picture(picture: Image.Image, path: str):
    """Write atomically: a temporary file beside `path`, then os.replace, so a reader never sees half a PNG.
    The format follows the name's extension (.png, .jpg, ...)."""
    image_format = picture_format(path)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        picture.save(temporary, format=image_format)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def picture_format(path: str) -> str:
    """The pillow format for a file name, or a PictureError saying which extensions work."""
    extension = os.path.splitext(path)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None or image_format not in Image.SAVE:
        raise PictureError(f"{path}: cannot tell the picture format from {extension or 'a missing extension'!r}; "
                           f"use .png (or .jpg, .webp)")
    return image_format


def check_output_path(path: str):
    """Before any model loads: the picture's folder must exist and its extension be one pillow writes."""
    picture_format(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PictureError(f"{path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise PictureError(f"{path} is a folder; give a file name such as {os.path.join(path, 'attention.png')}")


# ----------------------------------------------------------------------------------------------------------------
# Loss curves: train.py's log.jsonl (one record per optimizer step) drawn as two panels, loss above, lr below.

LOSS_COLOUR, SMOOTHED_COLOUR, LR_COLOUR = (150, 185, 230), (25, 80, 160), (215, 110, 20)
AXIS_COLOUR, GRID_COLOUR, TEXT_COLOUR = (60, 60, 60), (225, 225, 225), (20, 20, 20)


def read_log(path: str) -> list:
    """log.jsonl -> [{"step", "loss", "lr", ...}], in step order. Missing, empty or malformed: a PictureError."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        raise PictureError(f"{path}: no such file (train.py writes log.jsonl into its --out folder)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PictureError(f"{path}: cannot read ({error})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append(dict(step=int(record["step"]), loss=float(record["loss"]), lr=float(record["lr"])))
        except (ValueError, KeyError, TypeError):
            raise PictureError(f"{path} line {number}: not a train.py log record (step, loss, lr)") from None
        if not (math.isfinite(records[-1]["loss"]) and math.isfinite(records[-1]["lr"])):
            raise PictureError(f"{path} line {number}: the loss or lr is not a finite number")
    if not records:
        raise PictureError(f"{path}: the log is empty (no training step finished yet); nothing to plot")
    return sorted(records, key=lambda record: record["step"])


def plot_log(log_path: str, out_path: str | None = None) -> str:
    """Draw the loss and lr of `log_path` into `out_path` (default: loss.png beside the log); returns the path."""
    records = read_log(log_path)
    out_path = out_path or os.path.join(os.path.dirname(os.path.abspath(log_path)), "loss.png")
    check_output_path(out_path)
    name = os.path.basename(os.path.dirname(os.path.abspath(log_path))) or log_path
    save_picture(loss_curve(records, f"{name}: {len(records)} steps, last loss {records[-1]['loss']:.4f}"), out_path)
    return out_path


def font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # the small bitmap font


def smoothed(values: list, half_width: int) -> list:
    """The mean of each value's neighbourhood (up to half_width steps on each side): a centred moving average,
    which, unlike an exponential one, does not lag behind the data."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    out = []
    for i in range(len(values)):
        low, high = max(0, i - half_width), min(len(values), i + half_width + 1)
        out.append((sums[high] - sums[low]) / (high - low))
    return out


def nice_ticks(low: float, high: float, count: int = 5) -> list:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        return [low]
    raw_step = (high - low) / count
    power = 10 ** math.floor(math.log10(raw_step))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw_step)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list:
    """Ticks at 1, 2 and 5 times the powers of ten inside [low, high] (for a log-scale axis)."""
    ticks = []
    for power in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        ticks += [m * 10.0 ** power for m in (1, 2, 5) if low <= m * 10.0 ** power <= high]
    return ticks


def tick_label(value: float) -> str:
    """0.5, 2, 1e-3 (short labels: scientific notation only for small and large values)."""
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{value:.4g}"


def draw_panel(draw, box, steps, series, y_label, log_scale, step_range):
    """One panel: frame, grid, ticks with labels, and the lines. box = (left, top, right, bottom) of the plot area;
    series = [(values, colour, width)]; the first series sets the y range."""
    left, top, right, bottom = box
    small = font(12)
    values = [value for line_values, _, _ in series for value in line_values]
    low, high = min(values), max(values)
    if log_scale:
        transform, ticks = math.log10, log_ticks(low, high)
    else:
        transform, ticks = (lambda v: v), nice_ticks(low, high)
        low, high = min(low, ticks[0]), max(high, ticks[-1])
    y_low, y_high = transform(low), transform(high)
    if y_high - y_low < 1e-12:  # a flat line: give it some room
        y_low, y_high = y_low - 0.5, y_high + 0.5
    first_step, last_step = step_range
    x_of = lambda step: left + (right - left) * ((step - first_step) / max(last_step - first_step, 1))
    y_of = lambda value: bottom - (bottom - top) * ((transform(value) - y_low) / (y_high - y_low))
    for tick in ticks:  # horizontal grid lines with their labels on the left
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=GRID_COLOUR)
        label = tick_label(tick)
        draw.text((left - 6 - draw.textlength(label, font=small), y - 7), label, fill=TEXT_COLOUR, font=small)
    for tick in nice_ticks(first_step, last_step, 6):  # vertical grid lines, labels under the panel
        x = x_of(tick)
        draw.line([(x, top), (x, bottom)], fill=GRID_COLOUR)
        label = f"{tick:g}"
        draw.text((x - draw.textlength(label, font=small) / 2, bottom + 4), label, fill=TEXT_COLOUR, font=small)
    for line_values, colour, thickness in series:
        points = [(x_of(step), y_of(value)) for step, value in zip(steps, line_values)]
        if len(points) == 1:  # a log of one step: a dot
            x, y = points[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        else:
            draw.line(points, fill=colour, width=thickness, joint="curve")
    draw.rectangle(box, outline=AXIS_COLOUR)
    draw.text((left, top - 18), y_label, fill=TEXT_COLOUR, font=font(13))


def loss_curve(records: list, title: str, size=(900, 620)) -> Image.Image:
    """Two panels sharing the step axis: the loss (raw, and a moving average on top; log scale when it
    spans more than a factor of 3, since cross-entropy falls fast at first and slowly later), and the learning rate
    (warmup, then cosine decay: train.get_lr)."""
    width, height = size
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    draw.text((20, 12), title, fill=TEXT_COLOUR, font=font(16))
    steps = [r["step"] for r in records]
    losses, rates = [r["loss"] for r in records], [r["lr"] for r in records]
    step_range = (steps[0], steps[-1])
    left, right = 80, width - 30
    loss_box = (left, 70, right, int(height * 0.62))
    rate_box = (left, loss_box[3] + 60, right, height - 50)
    log_scale = min(losses) > 0 and max(losses) / min(losses) > 3
    series = [(losses, LOSS_COLOUR, 1)]  # (values, colour, line thickness)
    notes = ["log scale"] if log_scale else []
    if len(losses) >= 10:  # a moving average over about 1% of the run, drawn on top of the raw losses
        series.append((smoothed(losses, max(2, len(losses) // 100)), SMOOTHED_COLOUR, 2))
        notes.append("dark: moving average")
    draw_panel(draw, loss_box, steps, series, "loss" + (f" ({'; '.join(notes)})" if notes else ""), log_scale,
               step_range)
    draw_panel(draw, rate_box, steps, [(rates, LR_COLOUR, 2)],
               "learning rate (of --lr; every group follows this shape)", False, step_range)
    label = "step"
    draw.text(((left + right - draw.textlength(label, font=font(13))) / 2, height - 26), label, fill=TEXT_COLOUR,
              font=font(13))
    return picture
