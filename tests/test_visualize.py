"""visualize.py: the attention heat map against a hand computation, where its cells land on the picture, and the
loss curves drawn from train.py's log."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import imp
import reference as ref
import train
import visualize


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny random Imp in the official layout (transformers' Phi-2 and SigLIP), and our model loaded from it."""
    phi, siglip, mm = ref.phi_model(), ref.siglip_model(), ref.projector()
    folder = ref.write_imp(str(tmp_path_factory.mktemp("imp") / "imp"), phi, siglip, mm)
    return phi, siglip, mm, imp.Imp.from_pretrained(folder)


def rotate(vectors, positions, rotary_dim=32, theta=10000.0):
    """Rotary position embedding, written out: (T, 80) -> (T, 80). Dim i of the first 32 pairs with dim i + 16;
    the pair turns by the angle position * theta^(-2i / 32); dims 32..79 do not move."""
    half = rotary_dim // 2
    angles = positions[:, None].double() * theta ** (-2 * torch.arange(half).double() / rotary_dim)[None]  # (T, 16)
    cos, sin = angles.cos().float(), angles.sin().float()
    first, second = vectors[:, :half], vectors[:, half:rotary_dim]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, vectors[:, rotary_dim:]], dim=1)


def test_heat_map_equals_a_hand_computation(official):
    phi, siglip, mm, model = official
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    input_ids, pixel_values = imp.prepare_inputs(model, image, "What is in the picture?")  # system text, <image>, question
    answer = [17, 101, 5, 230, 64]
    grid, share = visualize.answer_attention(model, input_ids, pixel_values, answer)

    # By hand: the spliced sequence from transformers' own parts, then every layer's q and k from its weights.
    ids = input_ids[0].tolist() + answer
    image_at = ids.index(ref.IMAGE_TOKEN)
    assert 0 < image_at < len(input_ids[0]) - 1  # text on both sides, so a shifted column range cannot go unseen
    with torch.no_grad():
        features = siglip(pixel_values, output_hidden_states=True).hidden_states[-2][0]  # (N, 144)
        features = F.linear(F.gelu(F.linear(features, mm["0.weight"], mm["0.bias"])), mm["2.weight"], mm["2.bias"])
        embed = phi.model.embed_tokens
        sequence = torch.cat([embed(torch.tensor(ids[:image_at])), features, embed(torch.tensor(ids[image_at + 1:]))])
        output = phi(inputs_embeds=sequence[None], output_hidden_states=True, output_attentions=True)
    patches = features.shape[0]  # 16: a 56-px image in 14-px patches
    length = sequence.shape[0]
    prompt_length = len(input_ids[0]) - 1 + patches
    answer_rows = range(prompt_length - 1, prompt_length - 1 + len(answer))  # the rows that chose answer tokens
    image_columns = slice(image_at, image_at + patches)
    heads, head_dim = ref.PHI["num_attention_heads"], ref.PHI["hidden_size"] // ref.PHI["num_attention_heads"]
    positions = torch.arange(length)
    total, count = torch.zeros(patches), 0
    with torch.no_grad():
        for number, layer in enumerate(phi.model.layers):
            hidden = layer.input_layernorm(output.hidden_states[number][0])  # (T, 160): this layer's input, normed
            queries = F.linear(hidden, layer.self_attn.q_proj.weight, layer.self_attn.q_proj.bias)
            keys = F.linear(hidden, layer.self_attn.k_proj.weight, layer.self_attn.k_proj.bias)
            for head in range(heads):
                part = slice(head * head_dim, (head + 1) * head_dim)
                q, k = rotate(queries[:, part], positions), rotate(keys[:, part], positions)
                for row in answer_rows:
                    weights = torch.softmax(q[row] @ k[:row + 1].T / math.sqrt(head_dim), dim=0)  # causal: keys <= row
                    # the hand computation agrees with transformers' own probabilities
                    assert torch.allclose(weights, output.attentions[number][0, head, row, :row + 1], atol=1e-5)
                    total += weights[image_columns]
                    count += 1
    side = int(math.isqrt(patches))
    expected = (total / count).view(side, side)
    assert grid.shape == (side, side)
    assert torch.allclose(grid, expected, atol=1e-6), (grid - expected).abs().max()
    assert share == pytest.approx(expected.sum().item(), abs=1e-6) and 0 < share < 1


def test_an_empty_answer_maps_the_row_that_chose_to_stop(official):
    model = official[3]
    ids, pixels = imp.prepare_inputs(model, Image.new("RGB", (30, 30), "blue"), "What?")
    grid, share = visualize.answer_attention(model, ids, pixels, [])
    columns = visualize.image_positions(model, ids)[0]
    last_prompt_row = ids.shape[1] - 1 + len(columns) - 1
    expected = visualize.attention_maps(model, ids, pixels, [last_prompt_row])[..., columns].mean(dim=(0, 1, 2))
    assert torch.allclose(grid.flatten(), expected) and share == pytest.approx(expected.sum().item())


def test_image_positions_are_where_splice_puts_the_patches(official):
    model = official[3]
    patches, width = model.config.vision.num_patches, model.config.text.hidden_size
    ids = torch.tensor([[5, 6, ref.IMAGE_TOKEN, 7, 8, 9, ref.IMAGE_TOKEN, 10]])
    features = torch.randn(2, patches, width, generator=torch.Generator().manual_seed(0))
    embeddings, _ = model.splice(ids, features)
    positions = visualize.image_positions(model, ids)
    assert positions.tolist() == [list(range(2, 2 + patches)), list(range(5 + patches, 5 + 2 * patches))]
    for image in range(2):
        assert torch.equal(embeddings[0, positions[image]], features[image])
    text = [p for p in range(embeddings.shape[1]) if p not in set(positions.flatten().tolist())]
    assert torch.equal(embeddings[0, text], model.llm.embed_tokens(torch.tensor([5, 6, 7, 8, 9, 10])))
    assert visualize.image_positions(model, torch.tensor([[5, 6, 7]])).shape == (0, patches)


def test_heat_map_needs_exactly_one_image(official):
    model = official[3]
    ids = imp.prepare_inputs(model, None, "Hello?")[0]
    with pytest.raises(visualize.PictureError, match="exactly one image"):
        visualize.answer_attention(model, ids, None, [5])


def test_attention_hooks_are_removed_and_change_nothing(official):
    model = official[3]
    ids, pixels = imp.prepare_inputs(model, Image.new("RGB", (30, 30), "red"), "What?")
    before = model(ids, pixels)
    maps = visualize.attention_maps(model, ids, pixels)
    assert maps.shape == (2, 2, before.shape[1], before.shape[1])
    assert torch.allclose(maps.sum(-1), torch.ones(maps.shape[:-1]))  # every row of a softmax sums to 1
    assert torch.equal(maps, maps.tril())  # causal: no query attends to a later position
    assert all(not block.self_attn._forward_hooks for block in model.llm.layers)  # the hooks are removed again
    assert torch.equal(model(ids, pixels), before)


@pytest.mark.parametrize("aspect,expected_box", [("square", (40, 10, 60, 20)), ("pad", (40, 0, 60, 20))])
def test_heat_map_cells_land_where_the_model_saw_them(aspect, expected_box):
    """An 80x40 picture and a 4x4 grid with one hot cell (row 1, column 2). Squashed to a square, cells are 20 wide
    and 10 high; padded, the grid covers an 80x80 square whose rows 20..59 are the picture."""
    grid = torch.zeros(4, 4)
    grid[1, 2] = 1.0
    picture = visualize.heat_map_picture(Image.new("RGB", (80, 40), "white"), grid, aspect)
    assert picture.size == (80, 40) and picture.mode == "RGB"
    pixels = np.asarray(picture).astype(int)
    hottest = pixels.sum(axis=2) == pixels.sum(axis=2).max()
    rows, columns = np.nonzero(hottest)
    assert (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1) == expected_box
    assert hottest.sum() == 20 * (10 if aspect == "square" else 20)  # the cell and nothing else


def test_heat_map_picture_keeps_an_odd_size_and_an_all_zero_grid():
    picture = visualize.heat_map_picture(Image.new("L", (7, 13), 200), torch.zeros(3, 3), "pad")
    assert picture.size == (7, 13)


# -- loss curves -------------------------------------------------------------------------------------------------

def write_log(path, losses):
    total = len(losses)
    with open(path, "w") as f:
        for step, loss in enumerate(losses):
            lr = train.get_lr(step, total, 3, 1e-3)
            f.write(json.dumps(dict(step=step + 1, loss=loss, lr=lr, samples_per_second=10.0)) + "\n")


def line_heights(picture, colours, box):
    """Mean pixel row of the given colours in the leftmost and the rightmost tenth of `box` (left, top, right,
    bottom): a higher value is drawn lower on the picture."""
    pixels = np.asarray(picture)[box[1]:box[3], box[0]:box[2]]
    found = np.zeros(pixels.shape[:2], dtype=bool)
    for colour in colours:
        found |= (pixels == np.array(colour, dtype=np.uint8)).all(axis=2)
    rows, columns = np.nonzero(found)
    assert len(rows) > 100, "no line drawn"
    width = box[2] - box[0]
    left, right = rows[columns < width // 10], rows[columns > width - width // 10]
    return left.mean(), right.mean()


@pytest.mark.parametrize("direction", ["falling", "rising"])
def test_loss_curve_is_drawn_from_the_log(tmp_path, direction):
    losses = [5.0 * math.exp(-step / 12) + 0.2 for step in range(60)]
    write_log(tmp_path / "log.jsonl", losses if direction == "falling" else losses[::-1])
    path = visualize.plot_log(str(tmp_path / "log.jsonl"))
    assert path == str(tmp_path / "loss.png")
    picture = Image.open(path)
    assert (picture.format, picture.size) == ("PNG", (900, 620))
    picture = picture.convert("RGB")
    loss_panel = (80, 70, 870, int(620 * 0.62))
    start, end = line_heights(picture, [visualize.LOSS_COLOUR, visualize.SMOOTHED_COLOUR], loss_panel)
    assert (start < end) if direction == "falling" else (start > end)  # a falling loss starts high, ends low
    rate_panel = (80, loss_panel[3] + 60, 870, 620 - 50)
    start, end = line_heights(picture, [visualize.LR_COLOUR], rate_panel)
    assert end > start  # the cosine decay ends at 0, the bottom of the panel


def test_loss_curve_of_a_single_step(tmp_path):
    write_log(tmp_path / "log.jsonl", [1.5])
    assert Image.open(visualize.plot_log(str(tmp_path / "log.jsonl"), str(tmp_path / "one.png"))).size == (900, 620)


@pytest.mark.parametrize("content,expected", [("", "the log is empty"), ("\n\n", "the log is empty"),
                                              ('{"step": 1, "loss": 2.0, "lr": 0.001}\n{"step": 2}\n', "line 2"),
                                              (None, "no such file")])
def test_bad_logs_are_one_clear_line(tmp_path, capsys, content, expected):
    log = tmp_path / "log.jsonl"
    if content is not None:
        log.write_text(content)
    with pytest.raises(visualize.PictureError, match=expected):
        visualize.plot_log(str(log))
    with pytest.raises(SystemExit) as exit_:
        train.main(["--plot-log", str(log)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("train.py: error: ") and expected in err
    assert not (tmp_path / "loss.png").exists()


def test_plot_log_from_the_command_line(tmp_path, capsys):
    write_log(tmp_path / "log.jsonl", [3.0, 2.0, 1.0])
    train.main(["--plot-log", str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "curve.png")])
    assert capsys.readouterr().out == f"wrote {tmp_path / 'curve.png'}\n"
    assert Image.open(tmp_path / "curve.png").size == (900, 620)
