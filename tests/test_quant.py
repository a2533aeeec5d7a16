"""Tests for quant.py: the quantization math, the packed fast path against the readable one, the on-disk format,
whole-model quantization and loading, and the errors for bad input. Small shapes only: runs in seconds on CPU."""
import copy
import os
import platform

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import kernels
import quant

@pytest.fixture(autouse=True)
def use_torch_int4_kernel(torch_int4_kernel):
    """Here the packed path is torch's kernels and the layouts kept for them; kernels.c is tested in
    tests/test_kernels.py."""


needs_kernels = pytest.mark.skipif(not all(kernels.packed_kernels_available().values()),
                                   reason="torch's packed int8/int4 CPU kernels are not available here")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="checked where every build of the pinned torch has the kernels: x86-64")
def test_the_capability_probes_find_the_kernels_on_x86():
    # Where the kernels exist (x86-64 builds of torch 2.13, CI's included), the probes must find them. A probe that
    # breaks, e.g. an exception inside forward_fast, which the probe catches and reads as "no kernel", would turn
    # every @needs_kernels / @needs_int_mm test into a silent skip and the readable path into the only one tested.
    assert kernels.packed_kernels_available() == {8: True, 4: True}
    assert kernels.int8_matmul_available()


def random_weight(out_features, in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    weight[0, 3] = 0.5  # one outlier, as real LLM weights have
    weight[1] = 0.0     # an all-zero row (and all-zero groups): must not divide by zero
    weight[2, :128] = -0.01  # constant groups (for every group size): scale 0
    return weight


def enable_fast(model):
    """What a program does after loading: check the quantized buffers (quant.py), then switch the fast layer on."""
    quant.finish_loading(model)
    kernels.enable(model)
    return model


def same_bytes(a, b):
    """The same dtype, shape and bytes (torch.equal says -0.0 == 0.0; a saved file would differ)."""
    a, b = a.contiguous(), b.contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# -- 1. the math ------------------------------------------------------------------------------------------------


def test_int8_round_trip_error_is_at_most_half_a_step():
    weight = random_weight(40, 100)
    qweight, scales, reported = quant.quantize_int8(weight)
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float16 and qweight.abs().max() <= 127
    error = (quant.dequantize_int8(qweight, scales) - weight).abs()
    assert torch.equal(reported, error.amax(dim=1))  # the error it says it made is the error it made, per row
    # round() is off by at most half a step; the float16 scale can make 127 * scale fall short of absmax by
    # 2^-11 relative, i.e. 127 * 2^-11 = 0.06 more steps at the clamped extreme.
    step = scales.float()[:, None]
    assert torch.all(error <= 0.5 * step * 1.13 + 1e-8)
    # The same in the usual words: per row, max error <= absmax / 254 (plus the float16 slack).
    assert torch.all(error.amax(1) <= weight.abs().amax(1) / 254 * 1.13 + 1e-8)
    assert torch.equal(quant.dequantize_int8(qweight, scales)[1], torch.zeros(100))  # the zero row stays exact


def per_group(tensor, group_size):
    return tensor.float().repeat_interleave(group_size, dim=1)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_symmetric_round_trip_error_is_at_most_half_a_step(group_size):
    weight = random_weight(24, 256)
    weight[5, :32] = weight[5, :32].abs()  # a group with only positive weights: its scale is negative
    qweight, scales = quant.quantize_int4(weight, group_size)  # the default scheme: no zeros
    assert qweight.shape == (24, 128) and qweight.dtype == torch.uint8
    assert scales.shape == (24, 256 // group_size) and scales.dtype == torch.float16 and (scales < 0).any()
    q = quant.unpack_int4(qweight).long() - 8  # -8..7
    step = per_group(scales, group_size).abs()
    dequantized = quant.dequantize_int4(qweight, scales, None, group_size, 256)
    assert torch.equal(dequantized, q * per_group(scales, group_size))  # w = (q - 8) * scale, nothing else
    error = (dequantized - weight).abs()
    # Each group's largest-magnitude weight gets code 0 (q - 8 = -8) and decodes to itself (up to the float16
    # rounding of the scale: 8 * 2^-11 of a step). Half a step for every weight the clamp at +7 leaves alone
    # (w / scale <= 7.5, plus the same float16 slack); at most one step for the few it clamps.
    ratio = weight / per_group(scales, group_size).masked_fill(step == 0, 1)
    clamped = ratio > 7.5
    assert torch.all(error[~clamped] <= 0.5 * step[~clamped] * 1.01 + 1e-8)
    assert torch.all(error[clamped] <= step[clamped] * 1.01) and clamped.float().mean() < 0.02
    extreme = weight.abs().view(24, -1, group_size).argmax(-1, keepdim=True)
    assert torch.all(q.view(24, -1, group_size).gather(-1, extreme)[step.view(24, -1, group_size)[..., :1] > 0] == -8)
    assert torch.all(error[2, :128] <= 1e-5) and torch.equal(dequantized[1], torch.zeros(256))  # constant, zero rows
    assert (error / step.clamp_min(1e-12))[3:].mean() < 0.3  # a quarter step on average (uniform rounding error)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_asymmetric_round_trip_error_is_at_most_half_a_step(group_size):
    weight = random_weight(24, 256)
    qweight, scales, zeros = quant.quantize_int4(weight, group_size, "asymmetric")
    assert qweight.shape == (24, 128) and qweight.dtype == torch.uint8
    assert scales.shape == zeros.shape == (24, 256 // group_size) and scales.dtype == zeros.dtype == torch.float16
    error = (quant.dequantize_int4(qweight, scales, zeros, group_size, 256) - weight).abs()
    # Per element: half a step, plus float16 rounding of the scale (15 steps may fall 2^-11 short of the range,
    # 0.008 steps) and of the zero (2^-11 of |zero|).
    bound = 0.5 * per_group(scales, group_size) * 1.02 + per_group(zeros, group_size).abs() * 2**-10 + 1e-7
    assert torch.all(error <= bound)
    assert torch.all(error[2, :128] <= 1e-5)  # constant groups decode to their value
    # And the error is really that small: on average a quarter step (uniform rounding error), not more.
    assert (error / per_group(scales, group_size).clamp_min(1e-12))[3:].mean() < 0.3


def test_relative_errors_are_the_expected_size():
    weight = random_weight(32, 256, seed=1)
    error8 = (quant.dequantize_int8(*quant.quantize_int8(weight)[:2]) - weight).norm() / weight.norm()
    qweight, scales = quant.quantize_int4(weight, 32)
    symmetric = (quant.dequantize_int4(qweight, scales, None, 32, 256) - weight).norm() / weight.norm()
    asymmetric = (quant.dequantize_int4(*quant.quantize_int4(weight, 32, "asymmetric"), 32, 256) - weight).norm()
    asymmetric /= weight.norm()
    # For Gaussian rows: int8 step ~ 2.9 sigma / 127 -> error ~0.7%; int4 G=32 asymmetric step ~ 4.1 sigma / 15 ->
    # ~8%, symmetric 2.05 sigma / 8 -> ~9%. (Row 0's outlier makes int8 a little worse.) Catches e.g. a wrong
    # nibble order, a lost zero point, a wrong sign of the symmetric scale.
    assert error8 < 0.015 and 0.04 < asymmetric < symmetric < 0.13


def test_kernel_exact_numbers_are_held_exactly_by_float16_and_bfloat16():
    # Every bfloat16 number, and the float32 numbers just beside each (so both roundings are exercised).
    numbers = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    numbers = numbers[torch.isfinite(numbers)]
    numbers = torch.cat([numbers, numbers * (1 + 2**-10), numbers * (1 - 2**-10)])
    for round_up in (False, True):
        values = numbers.abs() if round_up else numbers
        exact = quant.kernel_exact(values, round_up=round_up)
        finite = torch.isfinite(exact)
        assert exact.dtype == torch.float16 and not finite[values.abs() < 65000].logical_not().any()
        assert same_bytes(exact[finite].to(torch.bfloat16).to(torch.float16), exact[finite])  # both hold it
        normal = finite & (values.abs() >= 2**-14)  # float16's normal range: the bfloat16 rounding itself
        assert torch.equal(exact[normal].float(), values[normal].to(torch.bfloat16).float() if not round_up else
                           exact[normal].float())
        assert ((exact[normal].float() - values[normal]).abs() <= values[normal].abs() * 2**-7).all()
        if round_up:
            assert (exact[normal].float() >= values[normal]).all()


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("magnitude", [1e-6, 1e-3, 1.0, 1e3])  # weights of std 2e-8 (scales below float16's
def test_int4_scales_and_zeros_are_exact_in_bfloat16(scheme, magnitude):  # normal range) .. std 20
    weight = random_weight(24, 256) * magnitude
    qweight, *numbers = quant.quantize_int4(weight, 32, scheme)
    for tensor in numbers:  # what lets a layer keep them only in the kernel's bfloat16 pairs
        assert tensor.dtype == torch.float16 and torch.isfinite(tensor).all()
        assert same_bytes(tensor.to(torch.bfloat16).to(torch.float16), tensor)
    if magnitude >= 1e-3:  # (below, float16 itself rounds the scales coarsely, as it always did)
        zeros = numbers[1] if scheme == "asymmetric" else None
        error = (quant.dequantize_int4(qweight, numbers[0], zeros, 32, 256) - weight).norm() / weight.norm()
        assert 0.03 < error < 0.13


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_rounding_the_scales_to_bfloat16_loosens_no_error_bound(scheme):
    # Gaussian groups; groups far from 0 relative to their range (1 + 0.02 randn: the bfloat16 rounding of a zero
    # near 1 moves it by up to 0.6 steps there); constant groups; and tied extremes of both signs.
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(256, 512, generator=generator) * 0.02
    weight[:64] += 1.0
    weight[64:80] = 0.3
    weight[80:96, 0::32], weight[80:96, 1::32] = 0.09, -0.09  # 0.09 / 8 rounds down to 8 bits: the far side
    weight[96:112, 0::32], weight[96:112, 1::32] = 0.09, -0.09 * (1 - 2**-9)  # would lie past 8 steps
    qweight, *numbers = quant.quantize_int4(weight, 32, scheme)
    zeros = per_group(numbers[1], 32) if scheme == "asymmetric" else 0
    scales = per_group(numbers[0], 32)
    step = scales.abs()
    error = (quant.dequantize_int4(qweight, *numbers, *([None] * (scheme == "symmetric")), 32, 512) - weight).abs()
    if scheme == "symmetric":  # w / scale <= 8 (the extreme's side: >= -8 - 8 * 2^-8, rounded to code 0); only
        ratio = weight / scales  # weights past 7.5 steps are clamped, by at most one step
        assert ratio.max() <= 8 and ratio.min() >= -8 * (1 + 2**-8)
        assert torch.all(error[ratio <= 7.5] <= 0.5 * step[ratio <= 7.5] * (1 + 1e-6))
        assert torch.all(error <= step * (1 + 1e-6))
    else:  # every weight within half a step, even far from 0 (no clamping beyond it); a constant group c gets
        assert torch.all(error <= 0.5 * step * (1 + 1e-5) + 1e-7)  # a tiny step that brings the rounded zero
        assert torch.all(error[64:80] <= 0.3 * 2**-12)  # back to within 2^-12 c (float16 alone: 2^-11)


@pytest.mark.parametrize("bits,scheme", [(8, "symmetric"), (4, "symmetric"), (4, "asymmetric")])
def test_quantizing_in_slices_of_rows_gives_the_same_tensors(monkeypatch, bits, scheme):
    weight = random_weight(200, 80, seed=2)
    whole = quant.quantize_int8(weight)[:2] if bits == 8 else quant.quantize_int4(weight, 32, scheme)
    monkeypatch.setattr(quant, "SLICE_WEIGHTS", 64 * 80)  # slices of 64 rows: 64, 64, 64, 8
    assert quant.row_slices(200, 80) == [(0, 64), (64, 128), (128, 192), (192, 200)]
    layer = kernels.PackedQuantLinear.from_linear(linear_with(weight), bits, 32, scheme)
    assert all(torch.equal(layer._buffers[name], tensor) for name, tensor in zip(layer.expected_buffers(), whole))
    expected = ((layer.dequantize() - weight).norm() / weight.norm()).item()
    assert quant.relative_error(weight, layer) == pytest.approx(expected, rel=1e-5)


def test_pack_unpack_nibble_order_and_round_trip():
    # Documented order: column 2j in the low nibble, column 2j+1 in the high nibble.
    assert quant.pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]
    q = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q)), q)


def test_in_features_not_a_multiple_of_the_group_is_padded_and_dropped_again():
    weight = random_weight(16, 80)  # 80 = 2.5 groups of 32 -> padded to 96
    layer = kernels.PackedQuantLinear.from_linear(linear_with(weight), bits=4, group_size=32, scheme="asymmetric")
    assert layer.qweight.shape == (16, 48) and layer.scales.shape == layer.zeros.shape == (16, 3)
    assert layer.dequantize().shape == (16, 80)
    assert (layer.dequantize() - weight).abs().max() <= layer.scales.float().max() * 0.51 + 1e-6
    x = torch.randn(3, 80)
    torch.testing.assert_close(layer.forward_readable(x), x @ layer.dequantize().T + layer.bias)


def linear_with(weight, bias=True):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias:
            linear.bias.normal_(0, 0.1)
    return linear


# -- 2. fast path vs readable path ---------------------------------------------------------------------------------


def assert_fast_matches_readable(fast, readable, x, weight):
    # The fast path rounds activations, scales and the output to bfloat16 (2^-9 relative each): the error of
    # y = x W^T is at most a few 2^-9 of sum |x| |W| per output, plus 2^-9 of |y|.
    magnitude = x.float().abs().reshape(-1, x.shape[-1]) @ weight.abs().T
    bound = 8e-3 * magnitude.reshape(fast.shape) + 4e-3 * readable.float().abs() + 1e-5
    assert fast.dtype == readable.dtype == x.dtype
    assert torch.all((fast.float() - readable.float()).abs() <= bound)


@needs_kernels
@pytest.mark.parametrize("bits,group_size,scheme", [(8, 32, "symmetric"), (4, 32, "symmetric"), (4, 64, "symmetric"),
                                                    (4, 128, "symmetric"), (4, 32, "asymmetric"),
                                                    (4, 128, "asymmetric")])
@pytest.mark.parametrize("in_features", [256, 80])  # 80: not a multiple of the group size (padded)
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # float16: output back in float16
def test_fast_path_matches_readable_path(bits, group_size, scheme, in_features, rows, dtype):
    weight = random_weight(48, in_features)
    weight[5, :32] = weight[5, :32].abs()  # a negative symmetric scale
    layer = kernels.PackedQuantLinear.from_linear(linear_with(weight), bits, group_size, scheme).to(dtype)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
    assert_fast_matches_readable(layer.forward_fast(x), layer.forward_readable(x), x, layer.dequantize())


@needs_kernels
def test_forward_picks_the_path_by_number_of_rows_and_keeps_leading_dims():
    layer = kernels.PackedQuantLinear.from_linear(linear_with(random_weight(32, 64)), 4, 32)
    small = torch.randn(1, 1, 64)  # decode: one row
    large = torch.randn(2, kernels.FAST_PATH_MAX_ROWS, 64)  # prefill: more rows than the threshold
    assert torch.equal(layer(small), layer.forward_fast(small)) and layer(small).shape == (1, 1, 32)
    assert torch.equal(layer(large), layer.forward_readable(large)) and layer(large).shape == large.shape[:2] + (32,)


def test_readable_fallback_when_kernels_are_missing(monkeypatch):
    layer = kernels.PackedQuantLinear.from_linear(linear_with(random_weight(32, 64)), 4, 32)
    monkeypatch.setattr(kernels, "packed_kernels_available", lambda: {4: False, 8: False})
    x = torch.randn(1, 64)
    assert not layer.fast_path_supported() and torch.equal(layer(x), layer.forward_readable(x))


@pytest.mark.parametrize("bits,out_features,in_features", [(4, 24, 64), (8, 32, 100)])
def test_shapes_the_kernels_cannot_take_use_the_readable_path(bits, out_features, in_features):
    # int4: N must be a multiple of 16; int8: K must be (else the kernel returns NaN or crashes).
    layer = kernels.PackedQuantLinear.from_linear(linear_with(random_weight(out_features, in_features)), bits, 32)
    assert not layer.fast_path_supported()
    x = torch.randn(5, in_features)
    assert torch.equal(layer(x), layer.forward_readable(x))


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_fast_path_survives_misaligned_tensors(bits):
    # The int8 kernel crashes on data that is not 16/32-byte aligned: a slice of a bigger tensor, or a tensor
    # that safetensors' load_file returns as a view into the file's bytes. The layer must copy such inputs.
    layer = kernels.PackedQuantLinear.from_linear(linear_with(random_weight(32, 64)), bits, 32)
    storage = torch.empty(64 * 32 + 3, dtype=layer.qweight.dtype)
    layer.qweight = storage[3:3 + layer.qweight.numel()].view(layer.qweight.shape).copy_(layer.qweight)
    layer.release_kernel_tensors()  # none built yet; would be rebuilt from the new qweight
    big = torch.randn(5 * 64 + 1, dtype=torch.bfloat16)
    x = big[1:].view(5, 64)  # starts 2 bytes past an aligned address
    assert_fast_matches_readable(layer.forward_fast(x), layer.forward_readable(x), x, layer.dequantize())


# -- 2b. the int4 kernel's layout: the only copy of the codes once the fast path is built ----------------------

needs_known_layout = pytest.mark.skipif(not kernels.packed_kernels_available()[4] or not kernels.int4_kernel_layout(),
                                        reason="no int4 kernel, or its layout is unknown here (layers keep both)")


@needs_kernels
@pytest.mark.parametrize("out_features", [16, 48, 64, 80, 112, 176, 4304])  # 4304: SigLIP's fc1, 67 x 64 + 16
@pytest.mark.parametrize("padded", [32, 96, 2560])
def test_kernel_layout_inverse_recovers_the_codes(out_features, padded):
    if kernels.int4_kernel_layout() is None:
        pytest.skip("the int4 converter's layout is none of INT4_KERNEL_LAYOUTS here: layers keep both copies")
    q = torch.randint(0, 16, (out_features, padded), generator=torch.Generator().manual_seed(out_features),
                      dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    layout = kernels.INT4_KERNEL_LAYOUTS[kernels.int4_kernel_layout()]
    assert torch.equal(kernels.codes_from_kernel_layout(packed, out_features, layout), q.to(torch.uint8))
    assert not torch.equal(packed, quant.pack_int4(q))  # really another order than ours (else this proves little)


def test_kernel_layouts_of_other_instruction_sets_are_recognised():
    # torch picks its CPU kernels when it is imported; ATEN_CPU_CAPABILITY=default forces the plain C++ ones, whose
    # converter writes the "pairs" order (AVX2 would give "avx2", AVX-512 "avx512").
    import subprocess
    import sys
    code = "import kernels; print(kernels.int4_kernel_layout(), kernels.packed_kernels_available()[4])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, ATEN_CPU_CAPABILITY="default"),
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    layout, available = result.stdout.split()
    assert layout == ("scalar" if available == "True" else "None")


def int4_layer(out_features, in_features, group_size=32, scheme="symmetric"):
    weight = random_weight(out_features, in_features, seed=out_features)
    return kernels.PackedQuantLinear.from_linear(linear_with(weight), 4, group_size, scheme)


@needs_known_layout
@pytest.mark.parametrize("out_features,in_features,group_size,scheme", [
    (48, 256, 32, "symmetric"),     # only a partial block (pairs)
    (112, 80, 32, "asymmetric"),    # one full block of 64 + a partial one of 48; K = 80 padded to 96
    (128, 200, 64, "symmetric"),    # two full blocks; K = 200 padded to 256
    (80, 64, 128, "asymmetric")])   # K = 64 padded to one group of 128
def test_fast_path_keeps_one_copy_and_the_readable_path_is_unchanged(out_features, in_features, group_size, scheme):
    layer = int4_layer(out_features, in_features, group_size, scheme)
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    weight = layer.dequantize()
    x = torch.randn(kernels.FAST_PATH_MAX_ROWS + 3, in_features, generator=torch.Generator().manual_seed(0))
    readable = layer.forward_readable(x)
    resident = layer.resident_bytes()

    layer.prepare_fast_path()
    assert "qweight" not in layer._buffers and layer.kernel_layout == kernels.int4_kernel_layout()
    # quantize_int4's scales (and zeros) are exact in bfloat16: held only in the kernel's pairs too
    assert not {"scales", "zeros"} & set(layer._buffers) and set(layer.kernel_holds) == set(before) - {"bias"}
    packed, scales_and_zeros = layer.kernel_tensors  # the codes in the kernel's order: as many bytes as qweight
    assert packed.nbytes == before["qweight"].nbytes  # held instead of qweight, not beside it; the pairs instead
    float16 = sum(before[name].nbytes for name in ("scales", "zeros") if name in before)  # of the float16 numbers:
    assert layer.resident_bytes() == resident + scales_and_zeros.nbytes - float16
    # The readable path (prefill) reads the codes back out of the kernel's layout: the very same weight.
    assert torch.equal(layer.dequantize(), weight) and torch.equal(layer.forward_readable(x), readable)
    assert torch.equal(layer(x), readable)  # more rows than FAST_PATH_MAX_ROWS: forward() takes that path
    # ... and the fast path still agrees with it.
    small = x[:5].to(torch.bfloat16)
    assert_fast_matches_readable(layer.forward_fast(small), layer.forward_readable(small), small, weight)
    # Saving writes our format, rebuilt: same keys, same order, same bytes.
    after = layer.state_dict()
    assert list(after) == list(before) == ["bias", "qweight", "scales"] + ["zeros"] * (scheme == "asymmetric")
    assert all(same_bytes(after[k], before[k]) for k in before)
    assert torch.equal(layer.stored_buffer("qweight"), before["qweight"])
    for start, end in ((0, 64), (64, None)) if out_features > 64 else ((0, None),):  # and any block of rows
        for name in set(before) - {"bias"}:
            assert same_bytes(layer.stored_buffer(name, start, end), before[name][start:end])


@needs_kernels
@pytest.mark.parametrize("failure", ["inverse differs", "layout unknown"])
def test_both_copies_are_kept_when_the_inverse_is_not_exact(monkeypatch, failure):
    if failure == "inverse differs":  # e.g. a future torch changes the order for some shapes
        original = kernels.codes_from_kernel_layout
        monkeypatch.setattr(kernels, "codes_from_kernel_layout", lambda *args: original(*args).flip(0))
    else:
        monkeypatch.setattr(kernels, "int4_kernel_layout", lambda: None)
    layer = int4_layer(112, 96, 32, "asymmetric")
    qweight, weight = layer.qweight.clone(), layer.dequantize()
    layer.prepare_fast_path()
    assert layer.kernel_layout is None and torch.equal(layer.qweight, qweight)  # today's behaviour: both copies
    assert torch.equal(layer.dequantize(), weight) and torch.equal(layer.state_dict()["qweight"], qweight)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    assert_fast_matches_readable(layer.forward_fast(x), layer.forward_readable(x), x, weight)


def not_bfloat16_exact(numbers, rows=slice(None)):
    """float16 numbers with 9-11 significant bits (as quant.py wrote them before kernel_exact): each non-zero one
    of `rows` nudged by one float16 unit, so that bfloat16 no longer holds it."""
    numbers = numbers.clone()
    bits = numbers[rows].view(torch.int16)
    numbers[rows] = torch.where(numbers[rows] != 0, bits + 1, bits).view(torch.float16)
    return numbers


@needs_kernels
@pytest.mark.parametrize("scheme,nudged", [("symmetric", "scales"), ("asymmetric", "scales"),
                                           ("asymmetric", "zeros")])
def test_scales_bfloat16_cannot_hold_are_kept_in_float16(scheme, nudged):
    # A file written by an older quant.py: float16 scales (or zeros) with more bits than bfloat16 keeps. The
    # kernel's pairs round them; the layer keeps its float16 buffers beside them (all of them: scales and zeros
    # go together), and the readable path and saving use those, as before.
    layer = int4_layer(112, 96, 32, scheme)
    with torch.no_grad():
        layer._buffers[nudged] = not_bfloat16_exact(layer._buffers[nudged], rows=slice(70, 71))  # one row only
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    weight, resident = layer.dequantize(), layer.resident_bytes()
    layer.prepare_fast_path()
    assert {"scales", "zeros"} & set(layer.kernel_holds) == set() and "scales" in layer._buffers
    assert ("zeros" in layer._buffers) == (scheme == "asymmetric")
    assert ("qweight" in layer.kernel_holds) == (kernels.int4_kernel_layout() is not None)  # the codes still go
    codes = before["qweight"].nbytes if "qweight" in layer.kernel_holds else 0
    assert layer.resident_bytes() == resident + layer.kernel_tensors[1].nbytes - codes + layer.kernel_tensors[0].nbytes
    assert torch.equal(layer.dequantize(), weight)  # the float16 numbers, not the pairs' rounding of them
    after = layer.state_dict()
    assert list(after) == list(before) and all(same_bytes(after[k], before[k]) for k in before)
    x = torch.randn(3, 96, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    assert_fast_matches_readable(layer.forward_fast(x), layer.forward_readable(x), x, weight)
    layer.to(torch.float32)  # released and rebuilt: the same again
    assert all(same_bytes(layer.state_dict()[k], before[k]) for k in before)
    layer(x.float())
    assert "scales" in layer._buffers and torch.equal(layer.dequantize(), weight)


@pytest.mark.parametrize("bits,prepared", [(8, False), (4, False), (4, True)])
def test_readable_path_dequantizes_large_weights_a_slice_of_rows_at_a_time(monkeypatch, bits, prepared):
    layer = kernels.PackedQuantLinear.from_linear(linear_with(random_weight(176, 96, seed=3)), bits, 32)  # 2 x 64 + 48
    if prepared and kernels.packed_kernels_available()[4]:
        layer.prepare_fast_path()
    weight = layer.dequantize()
    assert torch.equal(torch.cat([layer.dequantize(0, 64), layer.dequantize(64, 128), layer.dequantize(128)]), weight)
    x = torch.randn(kernels.FAST_PATH_MAX_ROWS + 1, 96, generator=torch.Generator().manual_seed(1))
    whole = layer.forward_readable(x)  # 176 x 96 weights: one slice
    monkeypatch.setattr(quant, "SLICE_WEIGHTS", 64 * 96)  # now slices of 64 rows: 64, 64, 48
    torch.testing.assert_close(layer.forward_readable(x), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, F.linear(x, weight, layer.bias), rtol=1e-6, atol=1e-6)
    if layer.kernel_layout is not None:  # the kernel's layout is read in whole blocks of rows (64 or 32 here)
        with pytest.raises(ValueError, match="whole blocks"):
            layer.codes(16, 96)


@pytest.mark.parametrize("bits", [4, 8])
def test_readable_path_reuses_scratch_memory_only_without_autograd(monkeypatch, bits):
    layer = kernels.PackedQuantLinear.from_linear(linear_with(random_weight(176, 96, seed=5)), bits, 32)
    if kernels.packed_kernels_available()[bits]:
        layer.prepare_fast_path()
    monkeypatch.setattr(quant, "SLICE_WEIGHTS", 64 * 96)  # three slices: 64, 64, 48 rows
    x = torch.randn(kernels.FAST_PATH_MAX_ROWS + 1, 96, generator=torch.Generator().manual_seed(3))
    weight = layer.dequantize()
    expected = F.linear(x, weight, layer.bias)
    for mode in (torch.inference_mode, torch.no_grad):  # generation: the weight is dead once F.linear returns
        with mode():
            first = layer.forward_readable(x)
            memory = kernels.scratch("weight", 1, torch.float32, "cpu").data_ptr()
            assert torch.equal(layer.forward_readable(x), first)
            assert kernels.scratch("weight", 1, torch.float32, "cpu").data_ptr() == memory  # reused, not new
            assert torch.equal(layer.dequantize(reuse=True), weight)
        torch.testing.assert_close(first, expected, rtol=1e-6, atol=1e-6)
    # With autograd, F.linear keeps the weight for the backward pass: a fresh one per slice, and the right gradient.
    x.requires_grad_(True)
    layer.forward_readable(x).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand_as(x), rtol=1e-6, atol=1e-6)


@needs_known_layout
def test_to_and_load_state_dict_on_a_layer_that_holds_only_the_kernel_layout():
    layer = int4_layer(80, 64)
    state = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    layer.prepare_fast_path()
    layer.to(torch.bfloat16)  # the codes go back into qweight (first, as registered) until the next fast call
    assert list(layer._buffers) == ["qweight", "scales"] and torch.equal(layer.qweight, state["qweight"])
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    layer(x)
    assert layer.kernel_layout is not None and list(layer._buffers) == []  # rebuilt; codes and scales dropped again
    other = int4_layer(80, 64)
    other.prepare_fast_path()
    other.load_state_dict(state)  # into a layer holding only the kernel layout: takes the new tensors
    assert torch.equal(other.stored_buffer("qweight"), state["qweight"]) and torch.equal(other.dequantize(), layer.dequantize())


# -- 2c. int8 activations (W8A8, opt-in): int8 x int8 products for large inputs -------------------------------------

needs_int_mm = pytest.mark.skipif(not kernels.int8_matmul_available(), reason="torch._int_mm does not work here")


def int8_activation_error_bound(layer, x):
    """The worst case of forward_int8_activations - forward_readable, per output. Both compute sum_k x w (the
    readable path with W' = dequantize()); the int8 path uses x + dx and W' + dW instead, where rounding to the
    grids moves each activation by |dx| <= row_scale / 2 = max|x row| / 254 and, for int4 layers requantized to
    int8, each weight by |dW| <= step / 2 = max|W' row| / 254 (int8 layers: dW = 0, their own codes). So
        |y'' - y'| = |sum dx W' + (x + dx) dW| <= row_scale / 2 * sum|W'| + step / 2 * sum|x + dx|,
    plus float32 rounding of the sums (1e-5 of sum |x| |W'|)."""
    x2d = x.reshape(-1, layer.in_features).float()
    weight = layer.dequantize()
    row_half_step = x2d.abs().amax(dim=1, keepdim=True) / 254  # [M, 1]
    bound = row_half_step * weight.abs().sum(dim=1)  # [M, N]
    if layer.bits == 4:  # (asymmetric: the int8 step may be up to 8/7 of max|W'| / 127, see int8_weight)
        weight_half_step = weight.abs().amax(dim=1) / 254 * (8 / 7 if layer.scheme == "asymmetric" else 1)  # [N]
        bound = bound + (x2d.abs().sum(dim=1, keepdim=True) + layer.in_features * row_half_step) * weight_half_step
    return (bound + 1e-5 * x2d.abs() @ weight.abs().T + 1e-6).reshape(*x.shape[:-1], -1)


@needs_int_mm
@pytest.mark.parametrize("bits,group_size,scheme", [(8, 32, "symmetric"), (4, 32, "symmetric"), (4, 64, "symmetric"),
                                                    (4, 32, "asymmetric")])
@pytest.mark.parametrize("in_features", [256, 80])  # 80: not a multiple of the group size (padded)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_activations_agree_with_the_readable_path(bits, group_size, scheme, in_features, bias):
    # Two roundings to 255 levels, each moving a factor by up to 1/254 of its row's largest value (uniformly: RMS
    # 1/(254 sqrt(3)) of it). Gaussian activations have max|x| ~ 3-4 RMS at these widths, so each rounding alone
    # costs ~0.7-0.9% RMS relative error of y, both together ~1% (int4; int8 layers keep their own weights): the
    # relative RMS error must stay below 2e-2, and no output may pass the worst case above.
    weight = random_weight(48, in_features)
    weight[5, :32] = weight[5, :32].abs()  # a negative symmetric scale
    layer = kernels.PackedQuantLinear.from_linear(linear_with(weight, bias), bits, group_size, scheme)
    enable_fast(layer)  # as loaded: int4 codes and scales may live only in the kernel's layout
    x = torch.randn(3, 50, in_features, generator=torch.Generator().manual_seed(in_features))  # 150 rows
    readable, a8 = layer.forward_readable(x), layer.forward_int8_activations(x)
    assert a8.shape == readable.shape == (3, 50, 48) and a8.dtype == x.dtype
    assert torch.all((a8 - readable).abs() <= int8_activation_error_bound(layer, x))
    relative = ((a8 - readable).norm() / readable.norm()).item()
    assert 1e-4 < relative < 2e-2  # and not zero: int8 activations really do round (it is not the readable path)


@needs_int_mm
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_activations_scale_each_row_by_itself(bits):
    # Tokens differ in size by orders of magnitude (outlier tokens): with one scale per row each row keeps its own
    # ~1% precision. One scale for the whole input would round the small rows to zero.
    layer = kernels.PackedQuantLinear.from_linear(linear_with(random_weight(64, 128)), bits, 32)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100, 128, generator=generator) * torch.logspace(-3, 3, 100)[:, None]
    readable, a8 = layer.forward_readable(x), layer.forward_int8_activations(x)
    per_row = (a8 - readable).norm(dim=1) / readable.norm(dim=1)
    assert per_row.max() < 2e-2
    assert torch.all((a8 - readable).abs() <= int8_activation_error_bound(layer, x))


@needs_int_mm
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_int4_weights_requantized_to_int8_per_row(scheme):
    # int8_weight: codes * step gives the int4 layer's own weight back within half an int8 step, and the step is
    # that of quantize_int8 (max|row| / 127; symmetric: exactly 8 |scale| / 127 of the row's largest group scale).
    weight = random_weight(128, 96)
    layer = kernels.PackedQuantLinear.from_linear(linear_with(weight), 4, 32, scheme)
    enable_fast(layer)
    dequantized = layer.dequantize()
    codes, step = layer.int8_weight(64, 128)
    codes, step = codes.clone(), step.clone()  # scratch memory: copied before the next call reuses it
    rows = dequantized[64:]
    assert codes.dtype == torch.int8 and codes.shape == (64, 96) and codes.abs().max() <= 127
    assert torch.all((codes.float() * step[:, None] - rows).abs() <= step[:, None] * (0.5 + 1e-5))
    largest = rows.abs().amax(dim=1)
    nonzero = largest > 0
    if scheme == "symmetric":
        torch.testing.assert_close(step[nonzero], largest[nonzero] / 127, rtol=1e-6, atol=0)
    else:  # an upper bound of max|row| from the (scale, zero) pairs: never smaller, here at most 1/7 larger
        assert torch.all(step[nonzero] * 127 >= largest[nonzero] * (1 - 1e-6))
        assert torch.all(step[nonzero] * 127 <= largest[nonzero] * 8 / 7 * (1 + 1e-6))
    assert torch.all(codes[~nonzero] == 0)


@needs_int_mm
def test_the_switch_chooses_the_path(monkeypatch):
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **k: calls.append(a[0].shape) or int_mm(*a, **k))
    model = nn.Sequential(kernels.PackedQuantLinear.from_linear(linear_with(random_weight(64, 96)), 4, 32),
                          nn.GELU(), kernels.PackedQuantLinear.from_linear(linear_with(random_weight(32, 64)), 8, 32))
    enable_fast(model)
    large = torch.randn(2, kernels.FAST_PATH_MAX_ROWS, 96)  # 128 rows: prefill-sized
    small = torch.randn(1, 1, 96)  # decode
    with torch.no_grad():
        off = model(large)
        assert calls == [] and torch.equal(off, model[2].forward_readable(F.gelu(model[0].forward_readable(large))))
        assert kernels.set_int8_activations(model, True) == 2
        on = model(large)
        assert len(calls) == 2 and calls[0] == (128, 96) and calls[1] == (128, 64)  # one slice each
        assert torch.equal(on, model[2].forward_int8_activations(F.gelu(model[0].forward_int8_activations(large))))
        assert not torch.equal(on, off)
        calls.clear()
        model(small)  # decode keeps the packed kernels (or the readable path where they are missing)
        assert calls == []
        assert kernels.set_int8_activations(model, False) == 0
        assert torch.equal(model(large), off) and calls == []
    kernels.set_int8_activations(model, True)
    x = large.clone().requires_grad_()
    model(x).sum().backward()  # a gradient through x: the readable path (rounding has none)
    assert calls == [] and x.grad is not None
    monkeypatch.setattr(kernels, "int8_matmul_available", lambda: False)  # a torch without a working _int_mm
    assert kernels.set_int8_activations(model, True) == 0
    with torch.no_grad():
        assert torch.equal(model(large), off) and calls == []


DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "demo")


@needs_int_mm
@pytest.mark.skipif(not os.path.isdir(DEMO), reason="no checkpoints/demo")
@pytest.mark.parametrize("bits", [8, 4])
def test_demo_model_with_int8_activations_stays_close_and_generates(monkeypatch, bits):
    # The trained demo model (real activations, not random ones), quantized with its vision tower: 16 image + ~10
    # text rows in prefill. Its vision tower has 16 rows, which the packed kernels would take: the threshold is
    # lowered so that the int8-activation path runs there too, decode (1 row) stays on the packed kernels.
    import imp
    monkeypatch.setattr(kernels, "FAST_PATH_MAX_ROWS", 8)
    model = imp.Imp.from_pretrained(DEMO, dtype=torch.float32)
    quant.quantize_model(model, bits=bits, include_vision=True)
    kernels.enable(model)
    examples = os.path.join(os.path.dirname(DEMO), "..", "examples")  # tracked, unlike data/shapes
    questions = [(imp.load_image(os.path.join(examples, name)), q) for name, q in
                 [("three_triangles.png", "Is there a yellow triangle?"), ("one_circle.png", "What color is the circle?"),
                  ("three_squares.png", "How many shapes are there?")]]
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **k: calls.append(1) or int_mm(*a, **k))
    with torch.inference_mode():
        for image, question in questions:
            input_ids, pixel_values = imp.prepare_inputs(model, image, question)
            kernels.set_int8_activations(model, False)
            readable = model(input_ids, pixel_values)[0]
            answer = list(model.generate(input_ids, pixel_values, max_new_tokens=12))
            assert calls == []
            assert kernels.set_int8_activations(model, True) > 0
            a8 = model(input_ids, pixel_values)[0]
            assert len(calls) > 0
            # The logits of every prompt position: relative RMS difference below 2% (measured 0.40-0.48%), the same
            # top token at >= 95% of the positions (measured 99-100%; most are image positions, where the model
            # predicts nothing in particular), and the same greedy answer (the demo answers confidently).
            assert ((a8 - readable).norm() / readable.norm()).item() < 0.02
            assert (a8.argmax(-1) == readable.argmax(-1)).float().mean() >= 0.95
            generated = list(model.generate(input_ids, pixel_values, max_new_tokens=12))
            assert generated == answer and model.tokenizer.decode(generated).strip()
            calls.clear()



# -- 3. whole models, the on-disk format, loading --------------------------------------------------------------


class TinyLanguageModel(nn.Module):
    def __init__(self, vocab=64, width=32):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                                  nn.Linear(4 * width, width)) for _ in range(2))
        self.final_layernorm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, input_ids, prefix=None):
        x = self.embed_tokens(input_ids)
        if prefix is not None:
            x = torch.cat((prefix, x), dim=1)
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(self.final_layernorm(x))


class TinyImp(nn.Module):
    """Imp's module names (vision, connector, llm.embed_tokens, llm.lm_head) at toy size."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 32))
        self.connector = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
        self.llm = TinyLanguageModel()

    def forward(self, input_ids, image_features):
        return self.llm(input_ids, prefix=self.connector(self.vision(image_features)))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyImp().eval()


def tiny_inputs(tokens=5, patches=3):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (1, tokens), generator=generator), torch.randn(1, patches, 48, generator=generator)


def test_plan_follows_the_documented_policy():
    model = tiny_model()
    plan = quant.quantization_plan(model, quant.quantization_config(bits=4))
    assert plan["llm.lm_head"] == 8 and plan["llm.embed_tokens"] == 8 and plan["llm.layers.0.1"] == 4
    assert not any(name.startswith(("vision", "connector")) for name in plan)
    assert not any("layernorm" in name or name.endswith(".0") for name in plan)  # norms stay float
    plan = quant.quantization_plan(model, quant.quantization_config(bits=4, include_vision=True, embedding_bits=16))
    assert plan["vision.0"] == plan["connector.2"] == 4 and "llm.embed_tokens" not in plan
    assert quant.quantization_plan(nn.Sequential(nn.Linear(4, 4)), quant.quantization_config(bits=8)) == {"0": 8}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_equals_the_model_with_dequantized_weights(bits):
    model = tiny_model()
    quantized = copy.deepcopy(model)
    config = quant.quantize_model(quantized, bits=bits, group_size=32, include_vision=True)
    assert config["bits"] == bits and config["format_version"] == quant.FORMAT_VERSION
    # The reference: the same float model, with each quantized weight replaced by its dequantization.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, quant.QuantizedModule):
                target = reference.get_submodule(name)
                target.weight.copy_(module.dequantize() if isinstance(module, quant.QuantLinear) else module.weight)
    rows = kernels.FAST_PATH_MAX_ROWS + 1  # more rows than the threshold: the readable path everywhere
    input_ids, image = tiny_inputs(tokens=rows, patches=rows)
    torch.testing.assert_close(quantized(input_ids, image), reference(input_ids, image), rtol=1e-5, atol=1e-5)
    # ... and it really is quantized: far from the float model at 4 bits, close at 8.
    error = (quantized(input_ids, image) - model(input_ids, image)).abs().max().item()
    assert 1e-4 < error < (0.5 if bits == 4 else 0.05)


@pytest.mark.parametrize("bits,scheme", [(4, "symmetric"), (4, "asymmetric"), (8, "symmetric")])
def test_safetensors_round_trip_into_a_meta_skeleton(tmp_path, bits, scheme):
    model = tiny_model()
    config = quant.quantize_model(model, bits=bits, group_size=64, include_vision=True, scheme=scheme)
    kernels.enable(model)
    state = model.state_dict()
    # Only the on-disk format is saved: no kernel layouts, float16 scales, uint8 nibbles.
    qweight_dtype = torch.uint8 if bits == 4 else torch.int8
    assert state["llm.layers.0.1.qweight"].dtype == qweight_dtype and state["llm.lm_head.qweight"].dtype == torch.int8
    assert {state[k].dtype for k in state if k.endswith((".scales", ".zeros"))} == {torch.float16}
    assert any(k.endswith(".zeros") for k in state) == (bits == 4 and scheme == "asymmetric")
    save_file(state, tmp_path / "model.safetensors", metadata={"quantization": str(config)})

    with torch.device("meta"):
        fresh = TinyImp()
    quant.prepare_for_loading(fresh, config)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True, strict=True)
    enable_fast(fresh.eval())
    if bits == 4 and kernels.packed_kernels_available()[4]:  # every int4 layer keeps its scales only in the pairs
        assert all("scales" in m.kernel_holds and "scales" not in m._buffers for m in fresh.modules()
                   if isinstance(m, quant.QuantLinear) and m.bits == 4)
    input_ids, image = tiny_inputs(tokens=2)  # a few rows: the fast path, where it exists
    assert torch.equal(fresh(input_ids, image), model(input_ids, image))
    input_ids, image = tiny_inputs(tokens=kernels.FAST_PATH_MAX_ROWS + 1)  # the readable path
    assert torch.equal(fresh(input_ids, image), model(input_ids, image))
    assert list(fresh.state_dict()) == list(state)
    assert all(same_bytes(fresh.state_dict()[k], state[k]) for k in state)  # saved again: the very same bytes


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_old_file_whose_scales_bfloat16_cannot_hold_loads_and_saves_unchanged(tmp_path, scheme):
    # The scales of one layer as an older quant.py wrote them (float16, not bfloat16-exact): that layer keeps its
    # float16 copy, the others hold theirs in the kernel's pairs only; saved again, the file is the same.
    model = tiny_model()
    config = quant.quantize_model(model, bits=4, group_size=32, include_vision=True, scheme=scheme)
    state = dict(model.state_dict())
    state["llm.layers.0.1.scales"] = not_bfloat16_exact(state["llm.layers.0.1.scales"])
    save_file(state, tmp_path / "model.safetensors")
    with torch.device("meta"):
        fresh = TinyImp()
    quant.prepare_for_loading(fresh, config)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True, strict=True)
    enable_fast(fresh.eval())
    old, new = fresh.llm.layers[0][1], fresh.llm.layers[1][1]
    if kernels.packed_kernels_available()[4]:
        assert "scales" in old._buffers and "scales" not in old.kernel_holds
        assert "scales" not in new._buffers and "scales" in new.kernel_holds
    for name, module in fresh.named_modules():  # every layer decodes the file's numbers, whichever it holds
        if isinstance(module, quant.QuantLinear) and module.bits == 4:
            zeros = state[f"{name}.zeros"] if scheme == "asymmetric" else None
            expected = quant.dequantize_int4(state[f"{name}.qweight"], state[f"{name}.scales"], zeros, 32,
                                             module.in_features)
            assert torch.equal(module.dequantize(), expected)
    assert list(fresh.state_dict()) == list(state)
    assert all(same_bytes(fresh.state_dict()[k], state[k]) for k in state)
    save_file(fresh.state_dict(), tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("bits,scheme", [(4, "symmetric"), (4, "asymmetric"), (8, "symmetric")])
def test_saved_file_is_the_same_whether_or_not_the_fast_path_was_built(tmp_path, bits, scheme):
    prepared, plain = tiny_model(), tiny_model()
    config = quant.quantize_model(prepared, bits, 32, include_vision=True, scheme=scheme)
    kernels.enable(prepared)  # builds the fast path
    quant.replace_modules(plain, config, lambda name, module, b: quant.quantize_module(module, b, 32, scheme))
    held_by_kernel = [m.kernel_layout is not None for m in prepared.modules() if isinstance(m, quant.QuantLinear)]
    dropped = bits == 4 and kernels.packed_kernels_available()[4] and kernels.int4_kernel_layout() is not None
    assert any(held_by_kernel) == dropped and not any(isinstance(m, kernels.PackedQuantLinear) for m in plain.modules())
    scales_in_pairs = [m for m in prepared.modules() if isinstance(m, quant.QuantLinear) and "scales" in m.kernel_holds]
    assert bool(scales_in_pairs) == (bits == 4 and kernels.packed_kernels_available()[4])
    save_file(prepared.state_dict(), tmp_path / "prepared.safetensors")
    save_file(plain.state_dict(), tmp_path / "plain.safetensors")
    assert list(prepared.state_dict()) == list(plain.state_dict())
    assert (tmp_path / "prepared.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def test_to_bfloat16_keeps_the_stored_format():
    layer = kernels.PackedQuantLinear.from_linear(linear_with(random_weight(32, 64)), 4, 32, "asymmetric").to(torch.bfloat16)
    assert layer.scales.dtype == layer.zeros.dtype == torch.float16 and layer.bias.dtype == torch.bfloat16
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    embedding = quant.QuantEmbedding.from_embedding(nn.Embedding(10, 8)).to(torch.bfloat16)
    assert embedding.scales.dtype == torch.float16 and embedding(torch.tensor([[1, 2]])).dtype == torch.bfloat16


def test_embedding_round_trip():
    embedding = nn.Embedding(20, 16)
    quantized = quant.QuantEmbedding.from_embedding(embedding)
    ids = torch.tensor([[0, 5, 19, 5]])
    step = quantized.scales.float()[ids][..., None]
    assert torch.all((quantized(ids) - embedding(ids)).abs() <= 0.5 * step * 1.13 + 1e-8)


# -- 4. bad input: one clear ValueError naming the tensor ----------------------------------------------------------


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        quant.QuantLinear(64, 32, True, bits=3, group_size=32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quant.QuantLinear(64, 32, True, bits=4, group_size=48)
    with pytest.raises(ValueError, match="format_version"):
        quant.prepare_for_loading(tiny_model(), dict(quant.quantization_config(), format_version=99))
    with pytest.raises(ValueError, match="scheme"):
        quant.quantization_plan(tiny_model(), dict(quant.quantization_config(), scheme="nf4"))
    with pytest.raises(ValueError, match="scheme"):
        quant.QuantLinear(64, 32, True, bits=4, scheme="asym")
    with pytest.raises(ValueError, match="scales"):
        quant.quantize_int8(torch.full((2, 4), 1e9))  # 1e9 / 127 overflows float16


@pytest.mark.parametrize("key,bad", [
    ("llm.layers.0.1.qweight", torch.zeros(128, 10, dtype=torch.uint8)),   # wrong shape
    ("llm.layers.0.1.qweight", torch.zeros(128, 16, dtype=torch.int32)),   # wrong dtype (right shape)
    ("llm.layers.0.1.scales", torch.zeros(128, 1, dtype=torch.float32)),   # wrong dtype
    ("llm.lm_head.scales", torch.zeros(63, dtype=torch.float16)),          # wrong shape
])
def test_mismatched_tensors_raise_clear_errors(key, bad):
    model = tiny_model()
    config = quant.quantize_model(model, bits=4, group_size=32)
    state = dict(model.state_dict(), **{key: bad})
    skeleton = quant.prepare_for_loading(tiny_model(), config)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):  # through load_state_dict ...
        skeleton.load_state_dict(state)
    skeleton = quant.prepare_for_loading(tiny_model(), config)  # ... and a loader that assigns buffers directly
    module_name, attribute = key.rsplit(".", 1)
    skeleton.get_submodule(module_name)._buffers[attribute] = bad
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        enable_fast(skeleton)


@pytest.mark.parametrize("written,read", [("asymmetric", "symmetric"), ("symmetric", "asymmetric")])
def test_checkpoint_with_another_scheme_is_refused(written, read):
    model = tiny_model()
    quant.quantize_model(model, bits=4, group_size=32, scheme=written)
    config = quant.quantization_config(bits=4, group_size=32, scheme=read)
    if written == "asymmetric":  # the config says symmetric, but the file has zero points: named, and explained
        message = r"llm\.layers\.0\.1\.zeros: unexpected; with bits=4, scheme=symmetric .* only qweight, scales"
        with pytest.raises(ValueError, match=message):
            quant.prepare_for_loading(tiny_model(), config).load_state_dict(model.state_dict())
        skeleton = quant.prepare_for_loading(tiny_model(), config)  # a loader that assigns buffers directly
        skeleton.llm.layers[0][1]._buffers["zeros"] = model.llm.layers[0][1].zeros
        with pytest.raises(ValueError, match=r"llm\.layers\.0\.1\.zeros: unexpected"):
            enable_fast(skeleton)
    else:  # the config says asymmetric, the file has no zero points
        with pytest.raises(RuntimeError, match=r"Missing key.*llm\.layers\.0\.1\.zeros"):
            quant.prepare_for_loading(tiny_model(), config).load_state_dict(model.state_dict())
        with torch.device("meta"):
            skeleton = quant.prepare_for_loading(TinyImp(), config)
        skeleton.load_state_dict(model.state_dict(), strict=False, assign=True)
        with pytest.raises(ValueError, match=r"llm\.layers\.0\.1\.zeros: never loaded"):
            enable_fast(skeleton)


def test_checkpoint_with_another_group_size_is_refused():
    model = tiny_model()
    quant.quantize_model(model, bits=4, group_size=64)
    skeleton = quant.prepare_for_loading(tiny_model(), quant.quantization_config(bits=4, group_size=32))
    with pytest.raises(ValueError, match=r"llm\.layers\.0\.1\.(qweight|scales)"):
        skeleton.load_state_dict(model.state_dict())


def test_unloaded_meta_buffers_are_reported():
    with torch.device("meta"):
        skeleton = TinyImp()
    quant.prepare_for_loading(skeleton, quant.quantization_config())
    with pytest.raises(ValueError, match="never loaded"):
        enable_fast(skeleton)


# -- 5. the command line on a tiny Imp folder (the official legacy layout: fused Wqkv, split while converting) -----


@pytest.fixture(scope="module")
def imp_folder(tmp_path_factory):
    reference = pytest.importorskip("reference")  # tests/reference.py: tiny random Imp checkpoints (transformers)
    root = tmp_path_factory.mktemp("quant")
    return reference.write_imp(str(root / "imp-legacy"), reference.phi_model(), reference.siglip_model(),
                               reference.projector(), legacy=True)


@pytest.mark.parametrize("bits,group_size,vision,scheme", [(4, 32, True, "symmetric"), (4, 64, False, "asymmetric")])
def test_converted_folder_loads_and_equals_quantize_model(imp_folder, tmp_path, bits, group_size, vision, scheme,
                                                          capsys):
    import json
    import imp
    out = tmp_path / "out"
    quant.main(["--model", imp_folder, "--out", str(out), "--bits", str(bits), "--group-size", str(group_size),
                "--scheme", scheme] + ["--vision"] * vision)
    assert "relative error" in capsys.readouterr().out  # progress: one line per quantized tensor
    expected = imp.Imp.from_pretrained(imp_folder)
    config = quant.quantize_model(expected, bits, group_size, include_vision=vision, scheme=scheme)
    assert json.load(open(out / "config.json"))["quantization"] == config
    loaded = quant.load(str(out))  # the streaming converter == quantize_model, bit for bit
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 300, (1, 12), generator=generator)
    input_ids[0, 3] = expected.config.image_token_index
    pixels = torch.rand(1, 3, 56, 56, generator=generator) * 2 - 1
    assert torch.equal(loaded(input_ids, pixels), expected(input_ids, pixels))
    tokens = list(loaded.generate(input_ids, pixels, max_new_tokens=8))
    assert tokens == list(expected.generate(input_ids, pixels, max_new_tokens=8))
    # The dequantized twin: the float model whose weights are the quantized model's dequantized ones. Decoding
    # runs the packed kernels (bfloat16 activations), the twin plain float32: the same greedy tokens.
    twin = imp.Imp.from_pretrained(imp_folder)
    with torch.no_grad():
        for name, module in loaded.named_modules():
            if isinstance(module, quant.QuantizedModule):
                twin.get_submodule(name).weight.copy_(module.dequantize())
    assert tokens == list(twin.generate(input_ids, pixels, max_new_tokens=8))


def test_folder_whose_config_and_tensors_disagree_is_refused(imp_folder, tmp_path):
    import json
    import imp
    from safetensors.torch import load_file, save_file
    out = tmp_path / "out"
    quant.convert(imp_folder, str(out), bits=4, scheme="asymmetric", log=lambda line: None)
    config = json.load(open(out / "config.json"))
    config["quantization"]["scheme"] = "symmetric"  # but every int4 layer still has its `zeros`
    json.dump(config, open(out / "config.json", "w"))
    with pytest.raises(imp.CheckpointError, match=r"unknown tensors: model\.layers\.0\.\S*\.zeros"):
        quant.load(str(out))
    config["quantization"]["scheme"] = "asymmetric"
    json.dump(config, open(out / "config.json", "w"))
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.fc1.scales"] = tensors["model.layers.0.mlp.fc1.scales"].float()  # corrupt dtype
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"fc1\.scales: expected float16 .* got float32"):
        quant.load(str(out))


def test_eval_reports_fidelity(imp_folder):
    samples = quant.eval_samples()[2:4]  # one text-only prompt, one with an image
    report = quant.evaluate(imp_folder, bits=8, new_tokens=4, samples=samples, log=lambda line: None)
    assert 0 <= report["kl"] < 0.05 and 0.5 <= report["top1_agreement"] <= 1 and report["positions"] > 0
    assert 0 <= report["free_run_agreement"] <= 1 and 0 <= report["identical_answers"] <= 2
    assert report["weight_error"]["fc1"] < 0.02 and "vision fc1" not in report["weight_error"]


def test_command_line_errors_are_one_line(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "quant.py", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no such model folder" in result.stderr


def folder_digest(folder):
    import hashlib
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("alias", ["symlink", "dotdot", "trailing-slash", "symlinked-parent"])
def test_output_folder_that_is_the_input_by_another_name_is_refused(imp_folder, tmp_path, alias):
    """Writing the int4 weights over the float ones being read would destroy the input: every spelling of the
    same folder is refused before anything is written, with one line and exit code 2."""
    import subprocess
    import sys
    before = folder_digest(imp_folder)
    parent, name = os.path.split(imp_folder)
    if alias == "symlink":
        out = tmp_path / "link"
        os.symlink(imp_folder, out)
    elif alias == "dotdot":
        out = os.path.join(imp_folder, "..", name)
    elif alias == "trailing-slash":
        out = imp_folder + os.sep + "." + os.sep
    else:
        os.symlink(parent, tmp_path / "parent-link")
        out = tmp_path / "parent-link" / name
    result = subprocess.run([sys.executable, "quant.py", "--model", imp_folder, "--out", str(out), "--bits", "4"],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "is the input folder" in result.stderr
    assert "Traceback" not in result.stderr and folder_digest(imp_folder) == before


def test_output_path_that_is_a_file_is_refused_before_any_work(imp_folder, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        quant.convert(imp_folder, str(out), bits=4, log=lambda line: pytest.fail("converted anyway: " + line))
    assert out.read_text() == "keep me"
