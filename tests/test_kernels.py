"""kernels.py, the fast layer: each speed path against the readable one (imp.py, quant.py). The packed int8 / int4
kernels have their own, larger set in test_quant.py."""
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
    tolerance = 0 if dtype == torch.float32 else 0.05  # bfloat16 rows by addmv: the same sums, another order
    with torch.inference_mode():  # autograd off: the in-place GELU
        torch.testing.assert_close(fast(ids, pixels), readable(ids, pixels), rtol=0, atol=tolerance)
        tokens = list(readable.generate(ids, pixels, max_new_tokens=6, stop_ids=[]))
        assert list(fast.generate(ids, pixels, max_new_tokens=6, stop_ids=[])) == tokens
    loss_fast, loss_readable = fast.loss(ids, ids, pixels), readable.loss(ids, ids, pixels)  # training: F.gelu
    loss_fast.backward()
    loss_readable.backward()
    assert torch.equal(loss_fast, loss_readable)
    assert torch.equal(fast.llm.layers[0].mlp.fc1.weight.grad, readable.llm.layers[0].mlp.fc1.weight.grad)


def test_in_place_gelu_is_the_tanh_gelu_and_leaves_training_alone():
    mlp = tiny_imp().llm.layers[0].mlp
    x = torch.randn(3, 64)
    expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    mlp.__class__ = kernels.InPlaceGeluMLP
    with torch.no_grad():
        assert torch.equal(mlp(x), expected)
    assert torch.equal(mlp(x), expected) and mlp(x).requires_grad


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
    assert "packed" in said
    with torch.inference_mode():
        torch.testing.assert_close(model(ids, pixels), readable, rtol=1e-5, atol=1e-5)
        # decode: one row through the packed kernels (bfloat16 activations): the same greedy tokens
        assert list(model.generate(ids, pixels, max_new_tokens=6, stop_ids=[])) == readable_tokens


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 96), (96,), (1, 96)])  # a decode step's (B, T, C), and other single rows
def test_bfloat16_single_row_fast_path_equals_f_linear(shape, bias, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append("mv") or torch.ops.aten.mv(*a))
    monkeypatch.setattr(torch, "addmv", lambda *a: calls.append("addmv") or torch.ops.aten.addmv(*a))
    generator = torch.Generator().manual_seed(3)
    layer = kernels.RowVectorLinear(96, 40, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0, 0.5, generator=generator)
        if bias:
            layer.bias.normal_(0, 2.0, generator=generator)  # large enough that dropping it would show
    x = torch.randn(shape, generator=generator).to(torch.bfloat16)
    fast, readable = layer(x), F.linear(x, layer.weight, layer.bias)
    assert calls == ["addmv" if bias else "mv"]
    assert fast.shape == readable.shape and fast.dtype == torch.bfloat16
    # Both sum in float32 and round to bfloat16 (8 bits): within a few 2^-8 of sum |x||w| (+ |b|) per output.
    magnitude = x.float().abs().reshape(-1) @ layer.weight.float().abs().T + (layer.bias.float().abs() if bias else 0)
    assert torch.all((fast.float() - readable.float()).abs().reshape(-1) <= 2 ** -7 * magnitude)
    exact = x.double().reshape(-1) @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    assert torch.all((fast.double().reshape(-1) - exact).abs() <= 2 ** -7 * magnitude)


def test_f_linear_where_the_fast_path_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "addmv", lambda *a: calls.append("addmv") or torch.ops.aten.addmv(*a))
    layer = kernels.RowVectorLinear(32, 8).to(torch.bfloat16)
    two_rows = torch.randn(1, 2, 32).to(torch.bfloat16)  # a prefill: the general product
    assert torch.equal(layer(two_rows), F.linear(two_rows, layer.weight, layer.bias))
    one_float_row = torch.randn(1, 1, 32)
    assert torch.equal(layer.float()(one_float_row), F.linear(one_float_row, layer.weight, layer.bias))
    assert calls == []


@pytest.mark.parametrize("emulated", [True, False])
def test_enable_chooses_the_row_vector_product_by_capability(monkeypatch, emulated):
    monkeypatch.setattr(kernels, "bfloat16_is_emulated", lambda: emulated)
    model = tiny_imp()
    kernels.enable(model)
    llm_linears = [m for m in model.llm.modules() if isinstance(m, nn.Linear)]
    assert llm_linears and all(isinstance(m, kernels.RowVectorLinear) == emulated for m in llm_linears)
    assert not any(isinstance(m, kernels.RowVectorLinear) for m in model.vision.modules())  # many rows there
    assert all(type(m) is kernels.InPlaceGeluMLP for m in model.llm.modules() if isinstance(m, imp.PhiMLP))


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_over_a_16_bit_cache_equals_the_fused_kernel(cache_dtype):
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
    two_rows = torch.randn(1, 2, 2, 32, generator=generator)  # a prompt chunk: the readable (causal) path
    assert torch.equal(attention.attend(two_rows, k, v), imp.attention(two_rows.to(cache_dtype), k, v, causal=True))


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_heads, window", [(4, None), (4, 7), (2, 7), (1, 100)])
def test_llama_decode_attention_keeps_the_window_and_the_head_groups(cache_dtype, kv_heads, window):
    config = imp.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=kv_heads, intermediate_size=96,
                             num_hidden_layers=1, vocab_size=32, sliding_window=window)
    attention = imp.LlamaAttention(config)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 1, 16, generator=generator) * 3  # large scores: a wrong key or head shows
    k, v = (torch.randn(1, kv_heads, 20, 16, generator=generator).to(cache_dtype) for _ in range(2))
    readable = attention.attend(q, k, v).double()
    attention.__class__ = kernels.LlamaDecodeAttention
    fast = attention.attend(q, k, v)
    visible = slice(-window, None) if window else slice(None)
    keys, values = (t[:, :, visible].double().repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
    exact = torch.softmax((q.double() @ keys.transpose(-2, -1)) / 16 ** 0.5, -1) @ values
    assert fast.dtype == torch.float32 and fast.shape == (1, 4, 1, 16)
    assert (fast.double() - exact).abs().max() < 1e-5
    assert (readable - exact).abs().max() < (3e-2 if cache_dtype == torch.bfloat16 else 5e-3)


def int4_tiny_imp():
    model = tiny_imp()
    quant.quantize_model(model, bits=4, group_size=32)
    return model


@pytest.mark.skipif(not kernels.packed_kernels_available()[4] or kernels.int4_kernel_layout() is None,
                    reason="no verified int4 kernel layout here")
def test_fused_q_k_v_compute_what_the_three_layers_do(monkeypatch):
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
