"""
The course's exercises, checked against the real implementation (imp.py, quant.py, train.py).

    python -m pytest exercises/                    # all of them, on your answers in exercises/*.py
    python -m pytest exercises/ -k attention       # one exercise: attention, wqkv, rotary, quantize, lora, labels
    NANOIMP_EXERCISES=solutions python -m pytest exercises/     # the same tests on docs/solutions/*.py
    NANOIMP_EXERCISES=path/to/folder python -m pytest exercises/  # or on any folder with the same file names

Each test builds small random inputs, runs your function and nanoImp's own code on them, and compares. Every
blank exercise fails (it raises NotImplementedError); tests/test_exercises_harness.py checks that, and that every
reference solution passes.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import imp
import quant
import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FOLDERS = {"exercises": HERE, "solutions": os.path.join(ROOT, "docs", "solutions")}
DEMO = os.path.join(ROOT, "checkpoints", "demo")


def answers_folder() -> str:
    choice = os.environ.get("NANOIMP_EXERCISES", "exercises")
    folder = FOLDERS.get(choice, choice)
    if not os.path.isdir(folder):
        pytest.exit(f"NANOIMP_EXERCISES={choice}: no such folder (use exercises, solutions, or a path)", returncode=2)
    return folder


def load(name: str):
    """The module `name`.py from the chosen folder, loaded by path (so that no folder shadows another)."""
    path = os.path.join(answers_folder(), f"{name}.py")
    if not os.path.isfile(path):
        pytest.fail(f"{path}: missing (copy exercises/{name}.py there)")
    spec = importlib.util.spec_from_file_location(f"answer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# attention (imp.attention_reference)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_imp(causal):
    q, k, v = random(2, 3, 5, 8, seed=1), random(2, 3, 5, 8, seed=2), random(2, 3, 5, 8, seed=3)
    ours = load("attention").attention(q, k, v, causal)
    assert ours.shape == (2, 3, 5, 8)
    torch.testing.assert_close(ours, imp.attention_reference(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_attention_queries_after_a_cache():
    """3 new queries after 4 cached keys: the mask is aligned bottom-right, as with a KV cache."""
    q, k, v = random(1, 2, 3, 8, seed=4), random(1, 2, 7, 8, seed=5), random(1, 2, 7, 8, seed=6)
    ours = load("attention").attention(q, k, v, True)
    torch.testing.assert_close(ours, imp.attention_reference(q, k, v, True), atol=1e-5, rtol=1e-5)


def test_attention_keeps_the_dtype_of_v():
    q, k, v = (random(1, 2, 4, 16, seed=s, dtype=torch.bfloat16) for s in (7, 8, 9))
    ours = load("attention").attention(q, k, v, True)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, imp.attention_reference(q, k, v, True), atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# wqkv (imp.key_table_phi, legacy layout)


def test_wqkv_matches_the_loader():
    hidden = 16
    config = imp.PhiConfig(hidden_size=hidden, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32,
                           vocab_size=64)
    table = imp.key_table_phi(config, "legacy", ours="")
    weight, bias = random(3 * hidden, hidden, seed=10), random(3 * hidden, seed=11)
    parts = load("wqkv").split_wqkv(weight, bias, hidden)
    assert set(parts) == {"q_proj", "k_proj", "v_proj"}
    for key, fused in (("transformer.h.0.mixer.Wqkv.weight", weight), ("transformer.h.0.mixer.Wqkv.bias", bias)):
        for name, rows in table[key]:  # e.g. ("layers.0.self_attn.q_proj.weight", slice(0, 16))
            projection = name.split(".")[-2]
            mine = parts[projection][0 if key.endswith("weight") else 1]
            torch.testing.assert_close(mine, fused[rows], atol=0, rtol=0)


def test_wqkv_computes_what_the_fused_layer_computes():
    hidden = 12
    fused = nn.Linear(hidden, 3 * hidden)
    with torch.no_grad():
        fused.weight.copy_(random(3 * hidden, hidden, seed=12))
        fused.bias.copy_(random(3 * hidden, seed=13))
    parts = load("wqkv").split_wqkv(fused.weight.detach(), fused.bias.detach(), hidden)
    x = random(5, hidden, seed=14)
    separate = torch.cat([F.linear(x, *parts[name]) for name in ("q_proj", "k_proj", "v_proj")], dim=-1)
    torch.testing.assert_close(separate, fused(x).detach(), atol=1e-6, rtol=1e-6)
    for weight, bias in parts.values():  # own storage: loading keeps no view into the fused tensor alive
        assert weight.untyped_storage().data_ptr() != fused.weight.untyped_storage().data_ptr()
        assert bias.untyped_storage().data_ptr() != fused.bias.untyped_storage().data_ptr()


# ----------------------------------------------------------------------------------------------------------------
# rotary (imp.apply_rotary)


def rotary_inputs(head_dim=80, rotary_dim=32, length=9):  # Phi-2: 32 of each head's 80 dims are rotated
    cos, sin = imp.rotary_cos_sin(torch.arange(length), rotary_dim, 10000.0, torch.float32)
    return random(2, 3, length, head_dim, seed=20), cos, sin


def test_rotary_matches_imp():
    x, cos, sin = rotary_inputs()
    ours = load("rotary").apply_rotary(x, cos, sin, 32)
    torch.testing.assert_close(ours, imp.apply_rotary(x, cos, sin, 32), atol=1e-6, rtol=1e-6)


def test_rotary_leaves_the_other_dims_and_position_zero_alone():
    x, cos, sin = rotary_inputs()
    ours = load("rotary").apply_rotary(x, cos, sin, 32)
    torch.testing.assert_close(ours[..., 32:], x[..., 32:], atol=0, rtol=0)  # the 48 pass-through dims
    torch.testing.assert_close(ours[:, :, 0], x[:, :, 0], atol=1e-6, rtol=0)  # angle 0 at position 0


def test_rotary_keeps_each_pair_length():
    """A rotation keeps the length of each (i, i + rotary_dim/2) pair: the interleaved pairing would not."""
    x, cos, sin = rotary_inputs(head_dim=64, rotary_dim=64)
    ours = load("rotary").apply_rotary(x, cos, sin, 64)
    pair_length = lambda t: t[..., :32] ** 2 + t[..., 32:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_length(ours), pair_length(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# quantize (quant.quantize_int8)


def weight_to_quantize():
    weight = random(48, 96, seed=30) * 0.05
    weight[3] = 0.0  # an all-zero row
    weight[7, 5] = 1.5  # a row with an outlier: its other weights get few levels
    return weight


def test_quantize_int8_matches_quant():
    weight = weight_to_quantize()
    qweight, scales, error = load("quantize").quantize_int8(weight)
    expected_q, expected_scales, expected_error = quant.quantize_int8(weight)
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float16 and error.dtype == torch.float32
    assert torch.equal(qweight, expected_q)
    assert torch.equal(scales, expected_scales)
    torch.testing.assert_close(error, expected_error, atol=1e-7, rtol=1e-5)


def test_quantize_int8_error_is_the_real_error_and_at_most_half_a_step():
    weight = weight_to_quantize()
    qweight, scales, error = load("quantize").quantize_int8(weight)
    decoded = quant.dequantize_int8(qweight, scales)
    torch.testing.assert_close(error, (weight - decoded).abs().amax(dim=1), atol=1e-7, rtol=1e-5)
    assert bool((error <= scales.float() / 2 + 1e-6).all())
    assert int(qweight.min()) >= -127 and float(error[3]) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# lora (imp.LoRALinear.merge / unmerge)


def lora_layer(rank=4, alpha=8.0):
    base = nn.Linear(24, 16)
    layer = imp.LoRALinear(base, rank=rank, alpha=alpha, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.copy_(random(16, rank, seed=40))  # trained: B is no longer zero
    return layer


def test_lora_merge_matches_imp_and_the_forward_pass():
    layer = lora_layer()
    weight = layer.base.weight.detach().clone()
    merged = load("lora").merge(weight, layer.lora_A.detach(), layer.lora_B.detach(), 8.0, 4)
    assert torch.equal(weight, layer.base.weight.detach())  # the input was not changed in place
    x = random(3, 24, seed=41)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, merged, layer.base.bias), layer(x), atol=1e-5, rtol=1e-5)
        layer.merge()
    torch.testing.assert_close(merged, layer.base.weight.detach(), atol=1e-6, rtol=1e-6)


def test_lora_unmerge_gives_the_base_weight_back():
    layer = lora_layer(rank=2, alpha=16.0)
    base = layer.base.weight.detach().clone()
    layer.merge()
    merged = layer.base.weight.detach().clone()
    answers = load("lora")
    restored = answers.unmerge(merged, layer.lora_A.detach(), layer.lora_B.detach(), 16.0, 2)
    torch.testing.assert_close(restored, base, atol=1e-6, rtol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(restored, layer.base.weight.detach(), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# labels (train.format_phi2 + train.tokenize)

CONVERSATION = [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                {"from": "gpt", "value": "The circle is red."},
                {"from": "human", "value": "How many shapes are there?"},
                {"from": "gpt", "value": "There are 2 shapes."}]


@pytest.fixture(scope="module")
def tokenizer():
    return imp.load_tokenizer(DEMO)


def test_labels_match_train(tokenizer):
    ids, labels = load("labels").ids_and_labels(tokenizer, CONVERSATION)
    expected_ids, expected_labels = train.tokenize(tokenizer, *train.format_phi2(CONVERSATION, True, "test"))
    assert list(ids) == expected_ids
    assert list(labels) == expected_labels


def test_labels_learn_both_answers_and_nothing_else(tokenizer):
    ids, labels = load("labels").ids_and_labels(tokenizer, CONVERSATION)
    learned = [token for token in labels if token != imp.IGNORE_INDEX]
    assert tokenizer.decode(learned, skip_special_tokens=False).replace(" ", "") == \
        "Thecircleisred.</s>Thereare2shapes.</s>"
