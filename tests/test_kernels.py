"""kernels.py, the fast layer: each speed path against the readable one (imp.py, quant.py). The packed int8 / int4
kernels have their own, larger set in test_quant.py."""
import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import imp
import kernels
import quant


def tiny_imp(seed=0):
    """An Imp with random weights at std 0.08 (large enough that a wrong GELU or a dropped bias shows)."""
    torch.manual_seed(seed)
    config = imp.ImpConfig(vision=imp.VisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                                   num_attention_heads=2, image_size=28, patch_size=14),
                           text=imp.PhiConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=2),
                           image_token_index=95, eos_token_id=94, pad_token_id=0, max_length=64)
    model = imp.Imp(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.08)
    return model.eval()


def prompt(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (1, 10), generator=generator)
    ids[0, 2] = model.config.image_token_index
    return ids, torch.rand(1, 3, 28, 28, generator=generator) * 2 - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_enabled_model_computes_what_the_readable_one_does(dtype):
    readable, fast = tiny_imp().to(dtype), tiny_imp().to(dtype)
    kernels.enable(fast)
    ids, pixels = prompt(readable)
    # float32: kernels.c's GELU, the same function rounded otherwise (exactly 0 without it); bfloat16 rows by addmv:
    # the same sums, another order
    tolerance = (0 if kernels.compiled_kernels() is None else 1e-5) if dtype == torch.float32 else 0.05
    with torch.inference_mode():  # autograd off: the in-place GELU
        torch.testing.assert_close(fast(ids, pixels), readable(ids, pixels), rtol=0, atol=tolerance)
        tokens = list(readable.generate(ids, pixels, max_new_tokens=6, stop_ids=[]))
        assert list(fast.generate(ids, pixels, max_new_tokens=6, stop_ids=[])) == tokens
    loss_fast, loss_readable = fast.loss(ids, ids, pixels), readable.loss(ids, ids, pixels)  # training: F.gelu
    loss_fast.backward()
    loss_readable.backward()
    assert torch.equal(loss_fast, loss_readable)
    assert torch.equal(fast.llm.layers[0].mlp.fc1.weight.grad, readable.llm.layers[0].mlp.fc1.weight.grad)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("tower", ["llm", "vision"])
def test_in_place_gelu_is_the_tanh_gelu_and_leaves_training_alone(monkeypatch, compiled, tower):
    if compiled and kernels.compiled_kernels() is None:
        pytest.skip("no compiled kernels here")
    if not compiled:
        monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)  # torch's gelu_: the very same numbers
    model = tiny_imp()
    mlp = model.llm.layers[0].mlp if tower == "llm" else model.vision.layers[0].mlp
    x = torch.randn(3, mlp.fc1.in_features) * 4
    expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    kernels.enable(model)
    assert type(mlp) is (kernels.InPlaceGeluMLP if tower == "llm" else kernels.InPlaceGeluSiglipMLP)
    with torch.no_grad():
        got = mlp(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 if compiled else 0)  # float32 rounding
    assert torch.equal(mlp(x), expected) and mlp(x).requires_grad  # autograd on: the readable forward


def test_enable_makes_quantized_layers_packed_and_equal_to_the_readable_ones(monkeypatch):
    monkeypatch.setattr(kernels, "FAST_PATH_MAX_ROWS", 3)  # the 4 patches and 10 tokens dequantize, decode is packed
    model = tiny_imp()
    quant.quantize_model(model, bits=4, group_size=32, include_vision=True)
    ids, pixels = prompt(model)
    with torch.inference_mode():
        readable = model(ids, pixels)
        readable_tokens = list(model.generate(ids, pixels, max_new_tokens=6, stop_ids=[]))
    said = kernels.enable(model)
    layers = [m for m in model.modules() if isinstance(m, quant.QuantLinear)]
    assert layers and all(isinstance(m, kernels.PackedQuantLinear) for m in layers)
    in_c = kernels.compiled_kernels() is not None  # decode through kernels.c, else torch's packed kernels
    assert ("packed int" in said) != in_c and ("decoding through kernels.c" in said) == in_c
    with torch.inference_mode():
        torch.testing.assert_close(model(ids, pixels), readable, rtol=1e-5, atol=1e-5)
        # decode: one row through the packed kernels (bfloat16 activations): the same greedy tokens
        assert list(model.generate(ids, pixels, max_new_tokens=6, stop_ids=[])) == readable_tokens


@pytest.mark.parametrize("path", ["addmv", "kernels.c"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 118), (118,), (1, 118)])  # a decode step's (B, T, C), and other single rows
def test_bfloat16_single_row_fast_path_equals_f_linear(shape, bias, path, monkeypatch):
    if path == "kernels.c" and kernels.compiled_kernels() is None:
        pytest.skip("no compiled kernels here")
    if path == "addmv":  # no compiler, and a CPU without native bfloat16
        monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)
        monkeypatch.setattr(kernels, "bfloat16_is_emulated", lambda: True)
    calls = []
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append("mv") or torch.ops.aten.mv(*a))
    monkeypatch.setattr(torch, "addmv", lambda *a: calls.append("addmv") or torch.ops.aten.addmv(*a))
    compiled = kernels.bfloat16_matvec_compiled
    monkeypatch.setattr(kernels, "bfloat16_matvec_compiled", lambda *a: calls.append("kernels.c") or compiled(*a))
    generator = torch.Generator().manual_seed(3)
    # 118 columns: kernels.c's steps of 32 columns, one of 16, and the last 6 one by one
    layer = kernels.RowVectorLinear(118, 40, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0, 0.5, generator=generator)
        if bias:
            layer.bias.normal_(0, 2.0, generator=generator)  # large enough that dropping it would show
    x = torch.randn(shape, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        fast, readable = layer(x), F.linear(x, layer.weight, layer.bias)
    assert calls == [path if path == "kernels.c" else "addmv" if bias else "mv"]
    assert fast.shape == readable.shape and fast.dtype == torch.bfloat16
    # Both sum in float32 and round to bfloat16 (8 bits): within a few 2^-8 of sum |x||w| (+ |b|) per output.
    magnitude = x.float().abs().reshape(-1) @ layer.weight.float().abs().T + (layer.bias.float().abs() if bias else 0)
    assert torch.all((fast.float() - readable.float()).abs().reshape(-1) <= 2 ** -7 * magnitude)
    exact = x.double().reshape(-1) @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    assert torch.all((fast.double().reshape(-1) - exact).abs() <= 2 ** -7 * magnitude)
    if path == "kernels.c":  # exact products summed in float32, rounded once: the float32 product's numbers, rounded
        want = F.linear(x.float(), layer.weight.float(), None if not bias else layer.bias.float()).bfloat16()
        assert (fast.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()


def test_f_linear_where_the_fast_path_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "addmv", lambda *a: calls.append("addmv") or torch.ops.aten.addmv(*a))
    compiled = kernels.bfloat16_matvec_compiled
    monkeypatch.setattr(kernels, "bfloat16_matvec_compiled", lambda *a: calls.append("kernels.c") or compiled(*a))
    layer = kernels.RowVectorLinear(32, 8).to(torch.bfloat16)
    two_rows = torch.randn(1, 2, 32).to(torch.bfloat16)  # a prefill: the general product
    assert torch.equal(layer(two_rows), F.linear(two_rows, layer.weight, layer.bias))
    one_row = torch.randn(1, 1, 32).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)  # no compiler, native bfloat16: F.linear
    monkeypatch.setattr(kernels, "bfloat16_is_emulated", lambda: False)
    assert torch.equal(layer(one_row), F.linear(one_row, layer.weight, layer.bias))
    one_float_row = torch.randn(1, 1, 32)
    assert torch.equal(layer.float()(one_float_row), F.linear(one_float_row, layer.weight, layer.bias))
    assert calls == []


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("emulated", [True, False])
def test_enable_chooses_the_row_vector_product_by_capability(monkeypatch, emulated, compiled):
    if compiled and kernels.compiled_kernels() is None:
        pytest.skip("no compiled kernels here")
    if not compiled:
        monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)
    monkeypatch.setattr(kernels, "bfloat16_is_emulated", lambda: emulated)
    model = tiny_imp()
    said = kernels.enable(model)
    llm_linears = [m for m in model.llm.modules() if isinstance(m, nn.Linear)]
    # kernels.c's row product wherever it compiled; torch.addmv where bfloat16 is emulated; else F.linear
    assert llm_linears and all(isinstance(m, kernels.RowVectorLinear) == (compiled or emulated) for m in llm_linears)
    assert ("bfloat16 rows by kernels.c" in said) == compiled and ("bfloat16 rows by addmv" in said) == (
        emulated and not compiled)
    assert not any(isinstance(m, kernels.RowVectorLinear) for m in model.vision.modules())  # many rows there
    assert all(type(m) is kernels.InPlaceGeluMLP for m in model.llm.modules() if isinstance(m, imp.PhiMLP))


@pytest.fixture(params=["in torch", "kernels.c"])
def attention_path(request, monkeypatch):
    """Decode attention over a 16-bit cache both ways: in torch, and by kernels.c where it compiled."""
    if request.param == "in torch":
        monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)
    elif kernels.compiled_kernels() is None:
        pytest.skip("no compiled kernels here")
    return request.param


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_over_a_16_bit_cache_equals_the_fused_kernel(cache_dtype, attention_path):
    attention = tiny_imp().llm.layers[0].self_attn
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 1, 32, generator=generator)  # one decode row, float32 (the model's dtype)
    k, v = (torch.randn(1, 2, 40, 32, generator=generator).to(cache_dtype) for _ in range(2))
    readable = attention.attend(q, k, v).float()
    attention.__class__ = kernels.DecodeAttention
    fast = attention.attend(q, k, v)
    assert fast.dtype == torch.float32
    exact = torch.softmax((q.double() @ k.double().transpose(-2, -1)) / 32 ** 0.5, -1) @ v.double()
    # both are float32 sums of the same 16-bit numbers; the fused kernel rounds q to the cache's dtype first
    assert (fast.double() - exact).abs().max() < 1e-5
    assert (readable.double() - exact).abs().max() < (1e-2 if cache_dtype == torch.bfloat16 else 2e-3)
    two_rows = torch.randn(1, 2, 2, 32, generator=generator)  # a prompt chunk: the fused kernel, in float32
    fast = attention.attend(two_rows, k, v)
    assert fast.dtype == torch.float32
    assert torch.equal(fast, imp.attention(two_rows, k.float(), v.float(), causal=True))
    exact = imp.attention(two_rows.double(), k.double(), v.double(), causal=True)
    assert (fast.double() - exact).abs().max() < 1e-5


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_heads, window", [(4, None), (4, 7), (2, 7), (1, 100)])
def test_llama_decode_attention_keeps_the_window_and_the_head_groups(cache_dtype, kv_heads, window, attention_path):
    config = imp.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=kv_heads, intermediate_size=96,
                             num_hidden_layers=1, vocab_size=32, sliding_window=window)
    attention = imp.LlamaAttention(config)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 1, 16, generator=generator) * 3  # large scores: a wrong key or head shows
    # the first 20 positions of a cache preallocated for 24, as imp.KVCache.update returns them
    k, v = (torch.randn(1, kv_heads, 24, 16, generator=generator).to(cache_dtype)[:, :, :20] for _ in range(2))
    readable = attention.attend(q, k, v).double()
    attention.__class__ = kernels.LlamaDecodeAttention
    fast = attention.attend(q, k, v)
    visible = slice(-window, None) if window else slice(None)
    keys, values = (t[:, :, visible].double().repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
    exact = torch.softmax((q.double() @ keys.transpose(-2, -1)) / 16 ** 0.5, -1) @ values
    assert fast.dtype == torch.float32 and fast.shape == (1, 4, 1, 16)
    assert (fast.double() - exact).abs().max() < 1e-5
    assert (readable - exact).abs().max() < (3e-2 if cache_dtype == torch.bfloat16 else 5e-3)
    two_rows = torch.randn(1, 4, 2, 16, generator=generator)  # a prompt chunk: the readable path, in float32
    assert torch.equal(attention.attend(two_rows, k, v),
                       imp.LlamaAttention.attend(attention, two_rows, k.float(), v.float()))


@pytest.mark.parametrize("rotary_dim, head_dim", [(32, 80), (64, 64)])  # Phi-2's partial rotary; Llama's whole
def test_rotation_in_place_is_apply_rotary_exactly(rotary_dim, head_dim):
    x = torch.randn(2, 3, 5, head_dim) * 3  # (B, T, heads, D)
    cos, sin = imp.rotary_cos_sin(torch.arange(40, 43), rotary_dim, 10000.0, torch.float32)
    want = imp.apply_rotary(x.transpose(1, 2), cos, sin, rotary_dim).transpose(1, 2)
    got = x.clone()
    kernels.rotate_in_place(got, cos, sin, rotary_dim)
    assert torch.equal(got, want)


def int4_tiny_imp():
    model = tiny_imp()
    quant.quantize_model(model, bits=4, group_size=32)
    return model


@pytest.mark.skipif(not kernels.packed_kernels_available()[4] or kernels.int4_kernel_layout() is None,
                    reason="no verified int4 kernel layout here")
def test_fused_q_k_v_compute_what_the_three_layers_do(monkeypatch, torch_int4_kernel):
    fused, separate = int4_tiny_imp(), int4_tiny_imp()
    assert "q, k, v in one product in 2 layers" in kernels.enable(fused)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "fuse_projections", lambda attention: False)
        assert "one product" not in kernels.enable(separate)
    ids, pixels = prompt(fused)
    with torch.inference_mode():
        assert list(fused.generate(ids, pixels, max_new_tokens=6, stop_ids=[])) == \
            list(separate.generate(ids, pixels, max_new_tokens=6, stop_ids=[]))
        x = torch.randn(1, 3, 64)
        rotary = imp.rotary_cos_sin(torch.arange(5, 8), 32, 10000.0, torch.float32)
        attention, alone = fused.llm.layers[1].self_attn, separate.llm.layers[1].self_attn
        for got, want in zip(attention.project(x, rotary), alone.project(x, rotary)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the same sums, in one call
        # each layer alone (a view of the fused pairs) and as stored: unchanged by the fusion
        for name in ("q_proj", "k_proj", "v_proj"):
            mine, theirs = getattr(attention, name), getattr(alone, name)
            torch.testing.assert_close(mine(x), theirs(x), rtol=0, atol=1e-6)
            assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
            assert mine.resident_bytes() == theirs.resident_bytes()
        # a layer that rebuilds its kernel layout (a move, a load): the fused product gives way
        expected = attention.project(x, rotary)
        attention.k_proj.release_kernel_tensors()
        assert not attention.fused_qkv.valid()
        for got, want in zip(attention.project(x, rotary), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# kernels.c, the compiled int4 kernel (x86 with AVX2, where a C compiler exists)

needs_compiled = pytest.mark.skipif(kernels.compiled_kernels() is None, reason="no compiled int4 kernel here")


@pytest.mark.skipif(not ({"avx2", "fma", "f16c"} <= kernels.cpu_flags() and kernels.shutil.which("cc")),
                    reason="needs x86 AVX2 and a C compiler")
def test_the_compiled_kernel_is_found_where_it_can_be_built():
    # Else a broken build or check would turn every @needs_compiled test into a silent skip.
    assert kernels.compiled_kernels() is not None


@needs_compiled
def test_compiled_gelu_is_the_tanh_gelu_over_its_range():
    x = torch.cat([torch.linspace(-30, 30, 60001), torch.tensor([0.0, -0.0, 1e-30, -1e-30]), torch.randn(8191) * 5])
    got = kernels.gelu_tanh_compiled(x.clone(), kernels.compiled_kernels())  # 8191: a partial vector at the end
    want = F.gelu(x, approximate="tanh")
    # torch's 1 + tanh(u) cancels to 0 where tanh(u) rounds to -1 (x below ~-5), so there the two are up to
    # |x| * 2^-24 apart; elsewhere within float32 rounding
    torch.testing.assert_close(got, want, rtol=2e-6, atol=5e-7)
    assert torch.equal(got[x >= 10], x[x >= 10]) and torch.all(got[x <= -10].abs() < 1e-30)


def int4_layer(out_features, in_features, group_size, scheme, bias, seed=0):
    generator = torch.Generator().manual_seed(seed)
    layer = quant.QuantLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), 4, group_size, scheme=scheme)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.08
    weight[1] = 0.0  # an all-zero row: scale 0
    with torch.no_grad():
        layer.load_quantized(weight)
        if bias:
            layer.bias.normal_(0, 0.5, generator=generator)
    return layer


def rounded(x, limit=127):
    """x as kernels.c rounds it: each block of 32 columns to step * q, step = the block's max |x| / limit (127:
    int8 activations, 32767: 16-bit ones)."""
    padded = F.pad(x, (0, -x.shape[-1] % 32))  # the padding columns are zeros
    blocks = padded.view(*x.shape[:-1], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / limit
    step[step == 0] = 1.0
    return ((blocks / step).round() * step).view_as(padded)[..., :x.shape[-1]]


def decode_through(layer, bits):
    """A PackedQuantLinear holding `layer`'s tensors, decoding through kernels.c with `bits`-bit activations."""
    fast = kernels.PackedQuantLinear.from_linear(nn.Linear(layer.in_features, layer.out_features,
                                                           bias=layer.bias is not None),
                                                 layer.bits, layer.group_size or 32, scheme=layer.scheme or "symmetric")
    fast.load_state_dict(layer.state_dict())
    fast.int8_decode, fast.int16_decode = bits == 8, bits == 16
    assert fast.fast_path_supported()
    return fast


def assert_rounded_product(got, layer, x, bits):
    """got is the readable product of exactly the rounded activations, and as far from the float product as that
    rounding moves it: int8 ~0.5% (more around an outlier, whose block shares its large step), 16 bits ~1e-5
    (closer than torch's kernels, whose bfloat16 activations move it ~3e-3)."""
    readable = layer(x)
    assert got.shape == readable.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, layer(rounded(x, 127 if bits == 8 else 32767)), rtol=1e-5,
                               atol=1e-4 if bits == 8 else 1e-5)
    error = (got - readable).norm() / readable.norm()
    assert 1e-4 < error < 0.05 if bits == 8 else error < 1e-4


@needs_compiled
@pytest.mark.parametrize("out_features, in_features, group_size, scheme", [
    (48, 288, 32, "symmetric"),  # 9 blocks: 8 at once, then the last of a pair alone
    (24, 328, 64, "asymmetric"), (40, 384, 128, "symmetric"),  # 12 blocks, 8 and 4 (328: padded columns)
    (17, 96, 32, "asymmetric")])  # 3 blocks, fewer than 8; 17 rows: torch's kernel would want 16s
@pytest.mark.parametrize("rows", [1, 3, 6])  # a decode step, within one tile of 4 rows, and past it
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bits", [8, 16])
def test_compiled_decode_of_int4_is_the_readable_product_of_the_rounded_activations(out_features, in_features,
                                                                                    group_size, scheme, rows, bias,
                                                                                    bits):
    layer = int4_layer(out_features, in_features, group_size, scheme, bias)
    x = torch.randn(1, rows, in_features) * 2
    x[..., :32] = 0.0  # an all-zero block of activations
    x[..., 40] = 30.0  # an outlier: its block's step is large, the other blocks' are not
    fast = decode_through(layer, bits)
    with torch.no_grad():
        got = fast(x)  # the bias added by the kernel
    assert fast.compiled
    assert_rounded_product(got, layer, x, bits)
    if bias:  # a bias being trained (quant.QuantLinear's is frozen): added by torch, the same sum, with a gradient
        fast.bias.requires_grad_(True)
        y = fast(x)
        assert torch.equal(y, got)
        y.sum().backward()
        assert torch.equal(fast.bias.grad, torch.full_like(fast.bias, rows))


@needs_compiled
def test_int8_decode_keeps_the_stored_tensors_and_rebuilds_after_a_move_or_a_load():
    layer = int4_layer(64, 128, 32, "asymmetric", True)
    fast = kernels.PackedQuantLinear.from_linear(nn.Linear(128, 64), 4, 32, scheme="asymmetric")
    fast.load_state_dict(layer.state_dict())
    fast.int8_decode = True
    x = torch.randn(1, 128)
    fast(x)
    assert fast.compiled and fast.kernel_holds == () and fast.kernel_tensors[0] is fast.qweight
    assert fast.resident_bytes() == fast.stored_bytes()  # no second layout
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), layer.state_dict().values()))
    other = int4_layer(64, 128, 32, "asymmetric", True, seed=5)
    fast.load_state_dict(other.state_dict())  # the new weight, not the old one
    assert not fast.compiled
    torch.testing.assert_close(fast(x), other(rounded(x)), rtol=1e-5, atol=1e-4)
    fast.to(torch.float32)
    assert not fast.compiled
    torch.testing.assert_close(fast(x), other(rounded(x)), rtol=1e-5, atol=1e-4)


@needs_compiled
def test_enable_with_int8_activations_decodes_through_the_compiled_kernels(monkeypatch):
    model, readable = int4_tiny_imp(), int4_tiny_imp()  # int4 layers, and the int8 lm_head
    calls = []
    for name in ("int4_matmul_compiled", "int8_matmul_compiled"):
        compiled = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, f=compiled, n=name, **k: calls.append(n) or f(*a, **k))
    monkeypatch.setattr(kernels, "int8_products_are_native", lambda: False)  # a CPU without VNNI: decode only
    flags = kernels.cpu_flags() - {"avx512f"}  # a CPU without AVX-512 (kernels.c decodes with it too)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    said = kernels.enable(model, int8_activations=True)
    layers = [m for m in model.modules() if isinstance(m, kernels.PackedQuantLinear)]
    assert {m.bits for m in layers} == {4, 8}
    assert f"int8 activations in {len(layers)} layers decoding through kernels.c" in said
    assert all(m.compiled and m.int8_decode and not m.int8_activations for m in layers)
    fused = [m.fused_qkv for m in model.modules() if m.__dict__.get("fused_qkv")]
    assert len(fused) == 2 and all(f.in_c for f in fused)  # each decoder layer's q, k, v: one compiled product
    ids, pixels = prompt(model)
    with torch.inference_mode():
        got, want = model(ids, pixels), readable(ids, pixels)  # 14 rows: all through the compiled kernels
    expected = collections.Counter(f"int{m.bits}_matmul_compiled" for m in layers)
    expected["int4_matmul_compiled"] -= 2 * len(fused)  # q, k, v: one call instead of three
    assert collections.Counter(calls) == expected
    assert 1e-4 < (got - want).norm() / want.norm() < 0.05
    # switched off again: kernels.c with 16-bit activations, from the same stored tensors
    assert kernels.set_int8_activations(model, False) == 0
    calls.clear()
    with torch.inference_mode():
        got = model(ids, pixels)
    assert sorted(calls) == sorted(f"int{m.bits}_matmul_compiled" for m in layers)
    assert all(m.compiled and m.int16_decode and not m.int8_decode for m in layers)
    assert (got - want).norm() / want.norm() < 1e-3


@needs_compiled
@pytest.mark.parametrize("int8_activations", [False, True])
def test_compiled_fused_q_k_v_are_the_three_layers_exactly(tmp_path, monkeypatch, int8_activations):
    flags = kernels.cpu_flags() - {"avx512f"}  # a CPU where kernels.c decodes
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    fused, separate = int4_tiny_imp(), int4_tiny_imp()
    assert "q, k, v in one product in 2 layers" in kernels.enable(fused, int8_activations)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "fuse_projections", lambda attention: False)
        kernels.enable(separate, int8_activations)
    attention, alone = fused.llm.layers[1].self_attn, separate.llm.layers[1].self_attn
    x = torch.randn(1, 3, 64)
    rotary = imp.rotary_cos_sin(torch.arange(5, 8), 32, 10000.0, torch.float32)
    with torch.inference_mode():
        for got, want in zip(attention.project(x, rotary), alone.project(x, rotary)):
            assert torch.equal(got, want)  # the activations rounded once instead of three times, identically
        ids, pixels = prompt(fused)
        assert list(fused.generate(ids, pixels, max_new_tokens=6, stop_ids=[])) == \
            list(separate.generate(ids, pixels, max_new_tokens=6, stop_ids=[]))
    for name in ("q_proj", "k_proj", "v_proj"):  # each layer: views of the fused buffers, saved as its own tensors
        mine, theirs = getattr(attention, name), getattr(alone, name)
        assert mine.qweight._base is attention.fused_qkv.buffers["qweight"]
        assert mine.resident_bytes() == theirs.resident_bytes()
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    imp.save_safetensors_file(dict(fused.state_dict()), tmp_path / "fused.safetensors")  # slices save as they are
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "fused.safetensors")
    assert all(torch.equal(saved[key], value) for key, value in separate.state_dict().items())
    other = int4_tiny_imp()
    other.llm.layers[1].self_attn.k_proj.qweight.bitwise_xor_(0x11)  # another weight for k
    attention.load_state_dict(other.llm.layers[1].self_attn.state_dict())
    assert not attention.fused_qkv.valid()  # the loaded layers, each on its own
    with torch.inference_mode():
        got = attention.project(x, rotary)
        kernels.enable(other, int8_activations)
        want = other.llm.layers[1].self_attn.project(x, rotary)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_compiled
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bits", [8, 16])
def test_compiled_decode_of_int8_is_the_readable_product_of_the_rounded_activations(rows, bits):
    generator = torch.Generator().manual_seed(0)
    layer = quant.QuantLinear.from_linear(nn.Linear(96, 40), 8)
    with torch.no_grad():
        layer.load_quantized(torch.randn(40, 96, generator=generator) * 0.08)
        layer.bias.normal_(0, 0.5, generator=generator)
        layer.qweight[0, :3] = torch.tensor([-127, 127, -127], dtype=torch.int8)  # the extremes, beside big x
    x = torch.randn(1, rows, 96, generator=generator) * 2
    x[..., 0] = 40.0
    fast = decode_through(layer, bits)
    with torch.no_grad():
        got = fast(x)  # the bias added by the kernel
    assert fast.compiled and fast.kernel_tensors[0] is fast.qweight
    assert_rounded_product(got, layer, x, bits)
    fast.bias.requires_grad_(True)  # a bias being trained: added by torch, the same sum
    assert torch.equal(fast(x), got)
    odd = kernels.PackedQuantLinear.from_linear(nn.Linear(80, 16), 8)  # 80 columns: not whole blocks of 32
    kernels.set_int8_activations(odd, True)
    assert not odd.int8_decode


def prompt_through(layer, monkeypatch):
    """A PackedQuantLinear holding `layer`'s tensors, its prompts through kernels.c (even where torch's product is
    chosen, with AVX-512); the calls are counted."""
    monkeypatch.setattr(kernels, "compiled_prompt_pays", lambda: True)
    fast = decode_through(layer, 16)  # (kernels.c takes the prompts of the layers it decodes, where that pays)
    calls = []
    compiled = kernels.prompt_matmul_compiled
    monkeypatch.setattr(kernels, "prompt_matmul_compiled", lambda *a, **k: calls.append(1) or compiled(*a, **k))
    return fast, calls


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features, in_features, group_size, scheme", [
    (150, 288, 32, "symmetric"), (80, 200, 64, "asymmetric"), (130, 1100, 128, "asymmetric")])  # padded columns
def test_compiled_dequantize_is_quants_dequantize_exactly(monkeypatch, dtype, out_features, in_features, group_size,
                                                          scheme):
    """Where torch's product takes the prompts (AVX-512), kernels.c decodes each slice of the int4 weight for it in
    one pass: the very numbers of quant.dequantize_int4, rounded to the activations' dtype as .to() rounds."""
    monkeypatch.setattr(kernels, "compiled_prompt_pays", lambda: False)
    layer = int4_layer(out_features, in_features, group_size, scheme, True)
    with torch.no_grad():
        layer.scales[2, 0] = -layer.scales[2, 0]  # a negative scale, as a file may hold
    fast = decode_through(layer, 16)
    calls = []
    compiled = kernels.dequantize_int4_compiled
    monkeypatch.setattr(kernels, "dequantize_int4_compiled", lambda *a, **k: calls.append(1) or compiled(*a, **k))
    for start, end in ((0, None), (5, 19)):
        got = fast.dequantized(dtype, start, end, reuse=True)
        assert torch.equal(got, layer.dequantize(start, end).to(dtype)) and got.dtype == dtype
    monkeypatch.setattr(quant, "SLICE_WEIGHTS", in_features * 64)  # a prompt in slices of 64 rows
    x = (torch.randn(70, in_features, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    calls.clear()
    with torch.inference_mode():
        got, want = fast(x), layer(x)
    assert len(calls) == len(quant.row_slices(out_features, in_features)) > 1  # every slice, through kernels.c
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5) if dtype == torch.float32 else \
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # bfloat16 products, another blocking


@needs_compiled
@pytest.mark.parametrize("out_features, in_features, group_size, scheme", [
    (48, 288, 32, "symmetric"), (24, 200, 64, "asymmetric"),  # padded columns
    (17, 96, 32, "asymmetric"),  # 17 outputs: a last tile of 1 of 16
    (300, 1100, 128, "asymmetric"), (260, 1056, 32, "symmetric")])  # 3 blocks of columns (512, 512, 128 or 32),
@pytest.mark.parametrize("rows", [65, 72, 200])  # 3 panels of outputs (128, 128, 44 or 4); a last tile of 5 rows
@pytest.mark.parametrize("bias", [True, False])
def test_compiled_prompt_of_int4_is_the_readable_product(out_features, in_features, group_size, scheme, rows, bias,
                                                         monkeypatch):
    layer = int4_layer(out_features, in_features, group_size, scheme, bias)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)) * 2
    fast, calls = prompt_through(layer, monkeypatch)
    with torch.inference_mode():
        got, want = fast(x), layer(x)
    assert calls == [1] and got.dtype == torch.float32
    # float32 sums of up to 1100 products in another order, nothing rounded: outputs of size ~5 agree to ~1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with torch.inference_mode():
        half = fast(x.to(torch.bfloat16))  # a bfloat16 model: the same product, in its dtype
    torch.testing.assert_close(half, layer(x.to(torch.bfloat16).float()).to(torch.bfloat16))


@needs_compiled
@pytest.mark.parametrize("out_features, in_features", [(40, 96), (150, 1056)])
def test_compiled_prompt_of_int8_is_the_readable_product(out_features, in_features, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    layer = quant.QuantLinear.from_linear(nn.Linear(in_features, out_features), 8)
    with torch.no_grad():
        layer.load_quantized(torch.randn(out_features, in_features, generator=generator) * 0.08)
        layer.bias.normal_(0, 0.5, generator=generator)
        layer.qweight[0, :3] = torch.tensor([-127, 127, -128], dtype=torch.int8)  # the extremes
    x = torch.randn(2, 70, in_features, generator=generator) * 2  # (B, T, K): 140 rows
    fast, calls = prompt_through(layer, monkeypatch)
    with torch.inference_mode():
        got, want = fast(x), layer(x)
    assert calls == [1] and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_compiled
def test_compiled_prompt_leaves_autograd_and_small_inputs_alone(monkeypatch):
    layer = int4_layer(48, 288, 32, "symmetric", True)
    fast, calls = prompt_through(layer, monkeypatch)
    x = torch.randn(70, 288, requires_grad=True)
    fast(x).sum().backward()  # with autograd: the readable path, which has a backward
    assert not calls and x.grad is not None
    with torch.no_grad():
        fast(x[:5])  # a decode-sized input: the decode kernels
    assert not calls


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("avx512", [False, True])
def test_compiled_decode_is_chosen_by_capability(monkeypatch, avx512, compiled):
    if compiled and kernels.compiled_kernels() is None:
        pytest.skip("no compiled kernels here")
    if not compiled:
        monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)
    flags = kernels.cpu_flags() | {"avx512f"} if avx512 else kernels.cpu_flags() - {"avx512f"}
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    model = int4_tiny_imp()
    kernels.enable(model, int8_activations=True)
    layers = [m for m in model.modules() if isinstance(m, kernels.PackedQuantLinear)]
    # decode through kernels.c wherever it compiled, with or without AVX-512
    assert all(m.int8_decode == m.compiled == compiled and not m.int16_decode for m in layers)
    plain = int4_tiny_imp()
    kernels.enable(plain)  # without int8 activations: 16-bit ones
    layers = [m for m in plain.modules() if isinstance(m, kernels.PackedQuantLinear)]
    assert all(m.int16_decode == m.compiled == compiled and not m.int8_decode for m in layers)
    # prompts through kernels.c only without AVX-512: with it, torch's product runs twice as wide
    assert all(m.prompt_in_c == (compiled and not avx512) for m in layers)


def test_no_compiler_or_a_failed_compile_means_no_compiled_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOIMP_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert kernels.compiled_kernels.__wrapped__() is None
    failing = tmp_path / "failing-cc"
    # a compiler that writes half a library (the file after -o), then fails
    failing.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho half > "$2"\nexit 1\n')
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    assert kernels.compiled_kernels.__wrapped__() is None
    assert [p.name for p in tmp_path.iterdir()] == ["failing-cc"]  # nothing half-written left in the cache
    monkeypatch.setenv("NANOIMP_COMPILE", "0")
    monkeypatch.delenv("CC")
    assert kernels.compiled_kernels.__wrapped__() is None


@needs_compiled
def test_a_compiled_kernel_with_wrong_numbers_is_not_used(tmp_path, monkeypatch):
    source = open(kernels.COMPILED_SOURCE).read()
    broken = source.replace("- 8.0f * s", "- 7.0f * s").replace("set1_ps(8.0f)", "set1_ps(7.0f)")  # wrong offsets
    assert broken.count("(7.0f)") + broken.count("- 7.0f") == 5
    (tmp_path / "kernels.c").write_text(broken)
    monkeypatch.setattr(kernels, "COMPILED_SOURCE", str(tmp_path / "kernels.c"))
    monkeypatch.setenv("NANOIMP_CACHE", str(tmp_path / "cache"))
    assert kernels.compiled_kernels.__wrapped__() is None
    monkeypatch.setattr(kernels, "COMPILED_SOURCE", str(tmp_path / "kernels.c"))
    (tmp_path / "kernels.c").write_text(source)  # the right source: compiled (a new hash) and used
    assert kernels.compiled_kernels.__wrapped__() is not None
    assert len(list((tmp_path / "cache").iterdir())) == 2
