"""
quant.py: weight-only int8 and int4 quantization for nanoImp, the readable version.

    python quant.py --model imp-v1-3b --bits 4 --vision --out imp-int4     # 1.91 GB: int4 symmetric, groups of 32
    python quant.py --model imp-v1-3b --bits 8 --out imp-int8              # 3.60 GB
    python quant.py --eval --model imp-v1-3b --bits 4                      # fidelity vs float32

A weight W [N, K] is stored as small integers q and a few floating-point scales; w ~ q * scale.
    int8: one scale per output row, q in -127..127 (section 1).
    int4: one scale (and, for the asymmetric scheme, one zero) per group of G = 32, 64 or 128 consecutive weights
          of a row, codes q in 0..15 decoded as (q - 8) * scale + zero (section 1).
The layers below hold those tensors and compute dequantize(W) then F.linear (section 2). Which layer gets which
bits is the plan (section 3); convert() writes a quantized folder tensor by tensor, load() reads one (section 4),
evaluate() measures how far quantization moves the model's answers (section 5).

This file is the readable path. The fast paths (torch's packed int8 / int4 CPU kernels for decode, int8 x int8
products for prefill, the layouts and scratch memory they need) are in kernels.py, which the programs switch on
with kernels.enable(model); tests pin every one of them to the numbers computed here. The on-disk format, the
scheme comparisons and the measured fidelity are in docs/quantization.md.
"""

import argparse
import ctypes
import functools
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import imp

FORMAT_VERSION = 1
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SCHEMES = ("symmetric", "asymmetric")  # of the int4 layers; int8 is always symmetric per row
DEFAULT_GROUP_SIZE = 32   # llama.cpp's Q4_0 block: 4.5 bits per weight with a float16 scale
SCALE_DTYPE = torch.float16  # scales and zeros on disk: 3 more mantissa bits than bfloat16, and range enough
# Large weights are quantized and measured a slice of rows at a time, at most this many weights (32 MB in float32)
# per slice: every scale belongs to one row, so slicing changes no result, only the size of the temporaries.
SLICE_WEIGHTS = 2**23


# ----------------------------------------------------------------------------------------------------------------
# 1. The arithmetic: quantize and dequantize one weight matrix.


def quantize_int8(weight):
    """weight [N, K] float -> (qweight int8 [N, K], scales float16 [N], error float32 [N]): one scale per row,
    symmetric. `error` is the largest |w - q * scale| of each row; it is at most scale / 2."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).to(SCALE_DTYPE)  # the row's largest |w| becomes 127
    check_finite("scales", scales)
    divisor = scales.float().masked_fill(scales == 0, 1.0)  # an all-zero row: q = 0 decodes it with any scale
    # Round with the *stored* (float16) scale, so that encoding and decoding use the very same number.
    qweight = torch.round(weight / divisor[:, None]).clamp(-127, 127).to(torch.int8)  # -127..127: symmetric
    error = (weight - dequantize_int8(qweight, scales)).abs().amax(dim=1)  # what this rounding cost, per row
    return qweight, scales, error


def dequantize_int8(qweight, scales):
    """[N, K] float32: each row's integers times its scale."""
    return qweight.float() * scales.float()[:, None]


def quantize_int4(weight, group_size=DEFAULT_GROUP_SIZE, scheme="symmetric"):
    """weight [N, K] float -> (qweight uint8 [N, Kp/2], scales float16 [N, Kp/G]), plus zeros float16 [N, Kp/G]
    for the asymmetric scheme. Kp is K rounded up to a multiple of G (zero columns; dequantize drops them).
    Codes q in 0..15 decode as (q - 8) * scale + zero, zero = 0 when symmetric."""
    check_settings(4, group_size, scheme)
    out_features, in_features = weight.shape
    padded = padded_in_features(in_features, 4, group_size)
    weight = F.pad(weight.float(), (0, padded - in_features))
    groups = weight.view(out_features, padded // group_size, group_size)  # [N, Kp/G, G]
    if scheme == "symmetric":
        # scale = (the weight of largest magnitude, sign kept) / -8: it gets code 0 (q - 8 = -8), the far side
        # reaches +7, and all 16 codes are used (llama.cpp's Q4_0).
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))[..., 0]  # [N, Kp/G]
        scales, zeros = kernel_exact(extreme / -8), None
        # A far-side weight within a rounding of |extreme| could land past +8 steps and be clamped by more than a
        # step: in those (rare) groups round the magnitude of the scale up instead.
        far = (groups / scales.float().masked_fill(scales == 0, 1.0)[..., None]).amax(dim=-1) > 8
        if far.any():
            larger = kernel_exact(extreme.abs() / 8, round_up=True) * -torch.sign(extreme).to(SCALE_DTYPE)
            scales = torch.where(far, larger, scales)
    else:  # asymmetric: 16 levels from the group's min to its max; code 8 decodes to `zero`
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, Kp/G]
        zeros = kernel_exact(low + 8 * (high - low) / 15)
        check_finite("zeros", zeros)
        # Rounding the zero moved it a little: take the smallest step, rounded up, that keeps low and high within
        # half a step of the end levels zero - 8 * scale and zero + 7 * scale.
        zero = zeros.float()
        needed = kernel_exact(torch.maximum((zero - low) / 8.5, (high - zero) / 7.5), round_up=True)
        scales = torch.maximum(kernel_exact((high - low) / 15), needed)
        groups = groups - zero[..., None]
    check_finite("scales", scales)
    divisor = scales.float().masked_fill(scales == 0, 1.0)  # a constant group: every q = 8 decodes to zero
    q = (torch.round(groups / divisor[..., None]) + 8).clamp(0, 15).to(torch.uint8).view(out_features, padded)
    return (pack_int4(q), scales) + (() if zeros is None else (zeros,))


def dequantize_int4(qweight, scales, zeros, group_size, in_features):
    """The float32 weight [N, K] (zeros: None for the symmetric scheme)."""
    q = unpack_int4(qweight)  # [N, Kp] codes 0..15
    out_features, padded = q.shape
    groups = q.view(out_features, padded // group_size, group_size).float()  # [N, Kp/G, G]
    zero = 0.0 if zeros is None else zeros.float()[..., None]
    weight = (groups - 8) * scales.float()[..., None] + zero
    return weight.view(out_features, padded)[:, :in_features]  # the padding columns dropped


def pack_int4(q):
    """[N, K] codes 0..15 (K even) -> [N, K/2] uint8: column 2j in the low 4 bits, column 2j+1 in the high 4."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed):
    """[N, K/2] uint8 -> [N, K] uint8 codes 0..15 (the inverse of pack_int4)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def kernel_exact(values, round_up=False):
    """float32 -> float16 numbers that bfloat16 holds exactly too: rounded to bfloat16's 8 significant bits (to
    the nearest, or with round_up to the next one at or above, for values >= 0), then stored as float16. torch's
    int4 kernel wants bfloat16 scales; with these the file's float16 ones can be rebuilt from the kernel's copy
    bit for bit, so memory need not hold both (kernels.py). A scale moves by up to 2^-8 of itself, far below the
    step's own rounding error."""
    rounded = values.to(torch.bfloat16)
    if round_up:  # for a positive number the next bfloat16 up is the next bit pattern
        rounded = torch.where(rounded.float() < values, (rounded.view(torch.int16) + 1).view(torch.bfloat16), rounded)
    return rounded.to(SCALE_DTYPE)


def padded_in_features(in_features, bits, group_size):
    return in_features if bits == 8 else -(-in_features // group_size) * group_size


def check_finite(name, tensor):
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: not representable in {SCALE_DTYPE} (weights too large or not finite)")


def check_settings(bits, group_size, scheme="symmetric"):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if bits == 4 and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def row_slices(rows, columns, multiple=64):
    """(start, end) pairs covering `rows`, each at most SLICE_WEIGHTS / columns rows, rounded down to `multiple`."""
    step = max(multiple, SLICE_WEIGHTS // columns // multiple * multiple)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def in_row_slices(quantize, weight, *settings):
    """quantize(weight, *settings), a slice of rows at a time; the same tensors as one call on the whole weight."""
    parts = [quantize(weight[start:end], *settings) for start, end in row_slices(*weight.shape)]
    return parts[0] if len(parts) == 1 else tuple(torch.cat(tensors) for tensors in zip(*parts))


# ----------------------------------------------------------------------------------------------------------------
# 2. Modules that hold the stored tensors as buffers, so that `<layer>.qweight` in a checkpoint fills `qweight`.


def describe(dtype, shape):
    return f"{str(dtype).replace('torch.', '')} {list(shape)}"


class QuantizedModule(nn.Module):
    """Shared by QuantLinear and QuantEmbedding: checks of the stored tensors, and a .to() that keeps them."""

    def expected_buffers(self) -> dict:  # name -> (shape, dtype), defined by the subclasses
        raise NotImplementedError

    def register_expected_buffers(self, device):
        for name, (shape, dtype) in self.expected_buffers().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))

    def stored_bytes(self) -> int:
        """Bytes of the tensors this layer saves (qweight, scales, zeros, bias): its share of the file."""
        buffers = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.expected_buffers().values())
        return buffers + sum(p.numel() * p.element_size() for p in self._parameters.values() if p is not None)

    def check_tensor(self, prefix, name, tensor):
        """One clear ValueError, naming the tensor, for anything that is not exactly the stored format."""
        expected = self.expected_buffers()
        if name not in expected:  # e.g. zero points for a layer whose config says scheme "symmetric"
            scheme = getattr(self, "scheme", None)
            raise ValueError(f"{prefix}{name}: unexpected; with bits={self.bits}, scheme={scheme}"
                             f" a layer stores only {', '.join(expected)} (the checkpoint does not match its config)")
        shape, dtype = expected[name]
        if tensor.is_meta:
            raise ValueError(f"{prefix}{name}: never loaded (still on the meta device)")
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{prefix}{name}: expected {describe(dtype, shape)}, "
                             f"got {describe(tensor.dtype, tensor.shape)}")

    def check_buffers(self, prefix=""):
        for name, tensor in self._buffers.items():
            self.check_tensor(prefix, name, tensor)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict would silently cast a float tensor into an int8 buffer: check first.
        for name in ("qweight", "scales", "zeros"):
            if prefix + name in state_dict:
                self.check_tensor(prefix, name, state_dict[prefix + name])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every floating-point buffer. The float16 scales and zeros are part of the
        # stored format (bfloat16 would lose 3 bits of them): they may change device, never dtype.
        kept = {name: self._buffers.pop(name) for name in ("scales", "zeros") if name in self._buffers}
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.output_dtype))  # what .to() does to a float tensor: device and dtype
        for name, tensor in kept.items():
            moved = torch.empty_like(tensor, device=probe.device) if tensor.is_meta else tensor.to(probe.device)
            self._buffers[name] = moved
        self.output_dtype = probe.dtype
        return self


class QuantLinear(QuantizedModule):
    """A drop-in for nn.Linear with an int8 or int4 weight: y = x dequantize(W)^T + b. group_size and scheme
    only matter for bits=4."""

    def __init__(self, in_features, out_features, bias: bool, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 device=None, dtype=None, scheme: str = "symmetric"):
        super().__init__()
        check_settings(bits, group_size, scheme)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size, self.scheme = (group_size, scheme) if bits == 4 else (None, None)
        self.output_dtype = dtype or torch.get_default_dtype()  # the model's float dtype (used by .to())
        self.register_expected_buffers(device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    def expected_buffers(self):
        N, K = self.out_features, self.in_features
        if self.bits == 8:
            return {"qweight": ((N, K), torch.int8), "scales": ((N,), SCALE_DTYPE)}
        groups = (N, padded_in_features(K, 4, self.group_size) // self.group_size)
        buffers = {"qweight": ((N, groups[1] * self.group_size // 2), torch.uint8), "scales": (groups, SCALE_DTYPE)}
        return buffers if self.scheme == "symmetric" else dict(buffers, zeros=(groups, SCALE_DTYPE))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                    scheme: str = "symmetric") -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                    device=linear.weight.device, dtype=linear.weight.dtype, scheme=scheme)
        with torch.no_grad():
            layer.load_quantized(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def load_quantized(self, weight):
        """Quantize a float weight [N, K] into this layer's buffers (registered order: state_dict's key order)."""
        if self.bits == 8:
            tensors = in_row_slices(quantize_int8, weight)[:2]  # the error is not stored
        else:
            tensors = in_row_slices(quantize_int4, weight, self.group_size, self.scheme)
        self._buffers.clear()
        self._buffers.update(zip(self.expected_buffers(), tensors))

    def dequantize(self, start=0, end=None):
        """The float32 weight [N, K] this layer stands for, or its output rows start .. end-1."""
        if self.bits == 8:
            return dequantize_int8(self.qweight[start:end], self.scales[start:end])
        zeros = self.zeros[start:end] if self.scheme == "asymmetric" else None
        return dequantize_int4(self.qweight[start:end], self.scales[start:end], zeros, self.group_size,
                               self.in_features)

    def forward(self, x):  # x: (..., K) -> (..., N)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self):
        group = f", group_size={self.group_size}, scheme={self.scheme}" if self.bits == 4 else ""
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, bits={self.bits}{group}"


class QuantEmbedding(QuantizedModule):
    """nn.Embedding with an int8 weight [V, D] and one float16 scale per row. A lookup reads one row per token, so
    this saves file size and memory, not time. Its output has the model's float dtype."""

    def __init__(self, num_embeddings, embedding_dim, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, 8
        self.output_dtype = dtype or torch.get_default_dtype()
        self.register_expected_buffers(device)

    def expected_buffers(self):
        return {"qweight": ((self.num_embeddings, self.embedding_dim), torch.int8),
                "scales": ((self.num_embeddings,), SCALE_DTYPE)}

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "QuantEmbedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.weight.device, embedding.weight.dtype)
        qweight, scales, _ = in_row_slices(quantize_int8, embedding.weight.detach())
        module._buffers["qweight"], module._buffers["scales"] = qweight, scales
        return module

    def dequantize(self, start=0, end=None):
        return dequantize_int8(self.qweight[start:end], self.scales[start:end])  # [V, D] float32, or rows of it

    @property
    def weight(self):
        """The dequantized table. Costly (V x D floats): only for code that reads .weight for its dtype or device."""
        return self.dequantize().to(self.output_dtype)

    def forward(self, input_ids):  # (B, T) -> (B, T, D)
        rows = F.embedding(input_ids, self.qweight).to(self.output_dtype)  # the int8 rows of the tokens
        return rows * self.scales[input_ids].to(self.output_dtype)[..., None]


# ----------------------------------------------------------------------------------------------------------------
# 3. The plan: which module gets what. One function, used both to quantize and to load.


def quantization_config(bits=4, group_size=DEFAULT_GROUP_SIZE, include_vision=False, lm_head_bits=8,
                        embedding_bits=8, scheme="symmetric") -> dict:
    """What config.json stores under "quantization"; quantization_plan turns it back into per-module settings."""
    config = dict(format_version=FORMAT_VERSION, bits=bits, group_size=group_size, scheme=scheme,
                  include_vision=include_vision, lm_head_bits=lm_head_bits, embedding_bits=embedding_bits)
    return check_config(config)


def check_config(config: dict) -> dict:
    if not isinstance(config, dict):
        raise ValueError(f"quantization: expected a dict, got {type(config).__name__}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"quantization.format_version: expected {FORMAT_VERSION}, got {config.get('format_version')!r}"
                         " (written by another version of quant.py)")
    if config.get("scheme") not in SCHEMES:
        raise ValueError(f"quantization.scheme: expected one of {SCHEMES}, got {config.get('scheme')!r}")
    check_settings(config.get("bits"), config.get("group_size"), config["scheme"])
    if config.get("lm_head_bits") not in (4, 8, 16) or config.get("embedding_bits") not in (8, 16):
        raise ValueError("quantization.lm_head_bits must be 4, 8 or 16 and embedding_bits 8 or 16, got "
                         f"{config.get('lm_head_bits')!r} and {config.get('embedding_bits')!r}")
    return config


def quantization_plan(model: nn.Module, config: dict) -> dict:
    """module name -> bits (8 or 4) for every module to be replaced. By name, so that the loader rebuilds exactly
    the same plan from config.json:
        decoder Linears (q/k/v/dense, fc1, fc2) -> `bits`      the bulk: 2.52 B of Phi-2's 2.78 B parameters
        lm_head                                 -> int8        its errors land directly on the logits
        embed_tokens                            -> int8        a lookup: saves size only, nearly lossless
        vision tower and connector Linears      -> `bits` with include_vision, else kept in float
        norms, biases, patch/position embeddings -> kept in float (tiny, and LayerNorms are sensitive)"""
    check_config(config)
    plan = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_vision = name.split(".", 1)[0] in ("vision", "connector")
        if isinstance(module, nn.Embedding) and leaf == "embed_tokens" and not is_vision:
            if config["embedding_bits"] == 8:
                plan[name] = 8
        elif isinstance(module, nn.Linear):
            bits = config["lm_head_bits"] if leaf == "lm_head" else \
                config["bits"] if (config["include_vision"] or not is_vision) else 16
            if bits != 16:
                plan[name] = bits
    return plan


def replace_modules(model: nn.Module, config: dict, make) -> nn.Module:
    """Swap each planned module for make(name, module, bits); returns the model (changed in place)."""
    for name, bits in quantization_plan(model, config).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(name, parent.get_submodule(child), bits))
    return model


def quantize_module(module, bits, group_size, scheme="symmetric"):
    if isinstance(module, nn.Embedding):
        return QuantEmbedding.from_embedding(module)
    return QuantLinear.from_linear(module, bits, group_size, scheme)


def quantize_model(model: nn.Module, bits=4, group_size=DEFAULT_GROUP_SIZE, include_vision=False,
                   lm_head_bits=8, embedding_bits=8, scheme="symmetric") -> dict:
    """Quantize a float model in place; returns the quantization config to store beside the weights."""
    config = quantization_config(bits, group_size, include_vision, lm_head_bits, embedding_bits, scheme)
    finish_loading(replace_modules(model, config,
                                   lambda name, module, bits: quantize_module(module, bits, group_size, scheme)))
    return config


def default_cache_dtype(model: nn.Module) -> torch.dtype | None:
    """The KV cache dtype when none is asked for: a quantized float32 model is run for its small memory, so its
    cache is float16 too (11 significant bits); anything else keeps the model's dtype (None), as transformers does."""
    quantized = any(isinstance(module, QuantizedModule) for module in model.modules())
    float32 = model.llm.final_layernorm.weight.dtype == torch.float32  # a float parameter in every variant
    return torch.float16 if quantized and float32 else None


# ----------------------------------------------------------------------------------------------------------------
# 4. Folders: load a quantized one, write one from a float one (streaming: one tensor in memory at a time).


def prepare_for_loading(model: nn.Module, config: dict) -> nn.Module:
    """Swap in empty QuantLinear / QuantEmbedding skeletons (same device as the module they replace, e.g. meta),
    so that a loader can fill `<module>.qweight`, `.scales`, `.zeros` (asymmetric only) and `.bias`."""
    def skeleton(name, module, bits):
        weight = module.weight
        if isinstance(module, nn.Embedding):
            return QuantEmbedding(module.num_embeddings, module.embedding_dim, weight.device, weight.dtype)
        return QuantLinear(module.in_features, module.out_features, module.bias is not None, bits,
                           config["group_size"], weight.device, weight.dtype, config["scheme"])
    return replace_modules(model, config, skeleton)


def finish_loading(model: nn.Module) -> nn.Module:
    """After every buffer is filled: check each one (shape, dtype, loaded at all), and give the quantized
    modules the model's float dtype."""
    float_dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            module.check_buffers(prefix=f"{name}." if name else "")
            if float_dtypes:
                module.output_dtype = float_dtypes[0]
    return model


def load(path, dtype=torch.float32, device="cpu", with_tokenizer=True) -> imp.Imp:
    """Any Imp folder: a float one as imp.Imp.from_pretrained loads it, a quantized one (written by convert) with
    QuantLinear / QuantEmbedding skeletons swapped in before its tensors stream in."""
    def swap_modules(model, checkpoint):
        if "quantization" in checkpoint.config:
            try:
                prepare_for_loading(model, checkpoint.config["quantization"])
            except ValueError as error:
                raise imp.CheckpointError(f"{path}/config.json: {error}") from None
    model = imp.Imp.from_pretrained(path, dtype, device, with_tokenizer, swap_modules)
    try:
        return finish_loading(model)
    except ValueError as error:  # a stored tensor of the wrong shape or dtype, named
        raise imp.CheckpointError(f"{path}: {error}") from None


def check_output_folder(model_dir, out_dir):
    """Refuse an output folder that is the input folder under another name (a symlink, a `..` path, a bind mount):
    writing there would overwrite the float weights being read. Real paths and inode identity are both compared;
    an output path that exists but is not a folder is refused before any work is done."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder")
    same = os.path.realpath(out_dir) == os.path.realpath(model_dir)
    if not same and os.path.isdir(out_dir):
        same = os.path.samefile(out_dir, model_dir)
    if same:
        raise ValueError(f"{out_dir}: is the input folder {model_dir}; write the quantized model to another folder")


def quantize_tensor(piece, kind, bits, group_size, scheme):
    """One checkpoint tensor -> the quantized module that replaces it, exactly as quantize_model would make it
    (the float module is built on the meta device and given `piece`: no copy)."""
    with torch.device("meta"):
        module = nn.Embedding(*piece.shape) if kind is nn.Embedding else nn.Linear(piece.shape[1], piece.shape[0],
                                                                                   bias=False)
    module.weight = nn.Parameter(piece, requires_grad=False)
    return quantize_module(module, bits, group_size, scheme)


def convert(model_dir, out_dir, bits=4, group_size=DEFAULT_GROUP_SIZE, include_vision=False, log=print,
            scheme="symmetric") -> dict:
    """Read an Imp folder (either official layout) one tensor at a time, quantize the planned weights, and write
    a folder that load() reads (current official layout + "quantization" in config.json, written last)."""
    checkpoint = imp.open_checkpoint(model_dir)
    if checkpoint.layout not in ("imp", "imp-legacy"):
        raise ValueError(f"{model_dir}: holds a {checkpoint.layout} checkpoint, not an Imp one")
    if checkpoint.config.get("quantization"):
        raise ValueError(f"{model_dir}: is already quantized; convert the float checkpoint instead")
    check_output_folder(model_dir, out_dir)
    config = imp.parse_config(checkpoint, imp.ImpConfig)  # a malformed config.json: one clear error
    settings = quantization_config(bits, group_size, include_vision, scheme=scheme)
    model = imp.build_on_meta(imp.Imp, config)  # shapes and module types only, for the plan
    plan, rename = quantization_plan(model, settings), imp.official_names(config)
    tensors, float_dtypes, started = {}, set(), time.time()
    for ours, piece in checkpoint_tensors(checkpoint, config):
        module_name, attribute = ours.rsplit(".", 1)
        if module_name in plan and attribute == "weight":
            quantized = quantize_tensor(piece, type(model.get_submodule(module_name)), plan[module_name],
                                        group_size, scheme)
            stem = rename(ours).rsplit(".", 1)[0]
            tensors.update({f"{stem}.{name}": quantized._buffers[name] for name in quantized.expected_buffers()})
            log(f"[{len(tensors):4d} tensors, {time.time() - started:5.0f}s] {stem} {list(piece.shape)} "
                f"-> int{plan[module_name]}, relative error {relative_error(piece, quantized):.4f}")
        else:
            tensors[rename(ours)] = piece.contiguous()  # norms, biases, embeddings kept in float
            float_dtypes.add(str(piece.dtype).replace("torch.", ""))
        give_back_freed_memory()
    os.makedirs(out_dir, exist_ok=True)
    imp.write_safetensors(out_dir, tensors, metadata={"quantization": json.dumps(settings)})
    imp.save_tokenizer(imp.load_tokenizer(model_dir), out_dir, config)
    torch_dtype = float_dtypes.pop() if len(float_dtypes) == 1 else "float16"
    imp.write_json(os.path.join(out_dir, "config.json"),
                   dict(config.to_dict(), torch_dtype=torch_dtype, quantization=settings))  # last: marks it complete
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    log(f"wrote {out_dir}: {size / 1e9:.3f} GB of weights ({len(tensors)} tensors) in {time.time() - started:.0f}s")
    return settings


def checkpoint_tensors(checkpoint, config):
    """(our parameter name, tensor) for every tensor Imp uses, read one at a time through the layout's key table."""
    from safetensors import safe_open
    table, unused = imp.key_table_imp(config, checkpoint.layout)
    unused = re.compile("|".join(unused)) if unused else None
    for file in checkpoint.files:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            if key not in table:
                if unused and unused.fullmatch(key):
                    continue  # tensors Imp never uses (SigLIP's 27th layer, its head)
                raise ValueError(f"{file}: unknown tensor {key}")
            with safe_open(file, framework="pt") as f:  # per tensor, as in imp.load_weights: a map
                tensor = f.get_tensor(key)               # kept open would hold a whole shard resident
            for ours, rows in table[key]:
                yield ours, tensor[rows].clone() if rows else tensor  # the legacy fused Wqkv feeds three layers


def relative_error(weight, quantized) -> float:
    """||W - W'|| / ||W||, W' the weight a quantized module stands for, summed a slice of rows at a time."""
    error = norm = 0.0
    for start, end in row_slices(*weight.shape):
        w = weight[start:end].float()
        error += (quantized.dequantize(start, end) - w).square().sum().item()
        norm += w.square().sum().item()
    return math.sqrt(error) / max(math.sqrt(norm), 1e-30)


@functools.cache
def libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to give back
        return None


def give_back_freed_memory():
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere). The converter keeps every small
    output and frees large temporaries between them; glibc only trims the heap's top by itself, so without this the
    freed holes pile up and the converter's memory grows to several times its output (docs/quantization.md)."""
    if libc() is not None and hasattr(libc(), "malloc_trim"):
        libc().malloc_trim(0)


# ----------------------------------------------------------------------------------------------------------------
# 5. Fidelity: how far quantization moves the model's answers (quant.py --eval).


def eval_samples():
    """A fixed prompt set: text questions, and questions about two drawn images (no files needed)."""
    from PIL import Image, ImageDraw
    images = []
    red_circle = [("ellipse", (40, 40, 180, 180), (220, 40, 40))]
    blue_square_green_circle = [("rectangle", (30, 200, 150, 320), (40, 80, 220)),
                                ("ellipse", (220, 60, 350, 190), (40, 170, 60))]
    for shapes in (red_circle, blue_square_green_circle):
        image = Image.new("RGB", (384, 384), (245, 245, 240))
        draw = ImageDraw.Draw(image)
        for kind, box, color in shapes:
            getattr(draw, kind)(box, fill=color)
        images.append(image)
    return [(None, "What is the capital of France?"),
            (None, "Write a short poem about the sea."),
            (None, "Explain in two sentences why the sky is blue."),
            (images[0], "What is in the image?"),
            (images[1], "Describe the shapes and their colors.")]


def load_samples(path, image_folder=None, limit=None):
    """(image, question) pairs from a LLaVA-format JSON file (e.g. data/shapes/test.json): each record's first
    question, its image path taken inside image_folder (default: the file's folder)."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError, RecursionError) as error:  # missing, a folder, not UTF-8, not JSON, nested deeply
        raise ValueError(f"{path}: cannot read it as JSON ({getattr(error, 'strerror', None) or error})") from None
    folder = os.path.realpath(image_folder or os.path.dirname(path) or ".")
    samples = []
    for index, record in enumerate(records[:limit] if isinstance(records, list) else [None]):
        try:
            question, image = record["conversations"][0]["value"], record.get("image")
            usable = isinstance(question, str) and isinstance(image, (str, type(None))) and "\0" not in (image or "")
            (question + (image or "")).encode("utf-8")  # lone surrogates (a \\udcff escape) are not text
        except (TypeError, KeyError, IndexError, AttributeError, UnicodeEncodeError):
            usable = False
        if not usable:
            raise ValueError(f"{path}: record {index}: expected a LLaVA record (conversations[0].value text, "
                             "an optional image path)") from None
        image_path = os.path.realpath(os.path.join(folder, image)) if image else None
        if image_path and os.path.commonpath([folder, image_path]) != folder:
            raise ValueError(f"{path}: record {index}: image {image!r} leads outside {folder}; refused")
        samples.append((imp.load_image(image_path) if image_path else None,
                        question.replace(imp.IMAGE_PLACEHOLDER, "").strip()))
    return samples


def answer_log_probs(model, full, pixel_values, answer_length):
    """log-softmax of the positions whose next token is an answer token: the prompt's last one, and all but the
    answer's last one -> (answer_length, vocab)."""
    return torch.log_softmax(model(full, pixel_values)[0, -answer_length - 1:-1], dim=-1)


@torch.inference_mode()
def evaluate(model_dir, bits=4, group_size=DEFAULT_GROUP_SIZE, include_vision=False, new_tokens=24, samples=None,
             log=print, scheme="symmetric", speed_up=None) -> dict:
    """float32 model vs the same model quantized, over the answer positions of the prompt set: how often the
    quantized model's greedy token equals the float model's with the float answer fed in (teacher forcing: one
    early difference does not shift everything after it), the mean KL(float || quantized) there, and the same
    agreement when both generate freely; plus the relative weight error per layer type. speed_up(model): called
    on the quantized model before it runs (quant.py --eval passes kernels.enable, the path users run)."""
    if imp.open_checkpoint(model_dir).config.get("quantization"):
        raise ValueError(f"{model_dir}: is already quantized; evaluate the float checkpoint")
    model, samples = imp.Imp.from_pretrained(model_dir, dtype=torch.float32), samples or eval_samples()
    say = log if len(samples) <= 10 else (lambda line: None)  # each answer, for a short prompt set only
    references = []
    for image, question in samples:
        input_ids, pixel_values = imp.prepare_inputs(model, image, question)
        answer = list(model.generate(input_ids, pixel_values, max_new_tokens=new_tokens))
        full = torch.cat((input_ids, torch.tensor([answer], dtype=input_ids.dtype)), dim=1)
        log_probs = answer_log_probs(model, full, pixel_values, len(answer))
        references.append((input_ids, pixel_values, full, answer, log_probs))
        say(f"float32: {question!r} -> {model.tokenizer.decode(answer)!r}")
    errors = {}  # layer type -> relative errors of its weights

    def quantize_and_measure(name, module, bits_here):
        quantized = quantize_module(module, bits_here, group_size, scheme)
        errors.setdefault(layer_type(name), []).append(relative_error(module.weight, quantized))
        return quantized
    settings = quantization_config(bits, group_size, include_vision, scheme=scheme)
    finish_loading(replace_modules(model, settings, quantize_and_measure))
    notes = speed_up(model) if speed_up else None
    kl, agree, count, identical, free_agree, free_count = 0.0, 0, 0, 0, 0, 0
    for input_ids, pixel_values, full, answer, reference in references:
        log_probs = answer_log_probs(model, full, pixel_values, len(answer))
        kl += (reference.exp() * (reference - log_probs)).sum().item()
        agree += (reference.argmax(-1) == log_probs.argmax(-1)).sum().item()
        count += len(answer)
        generated = list(model.generate(input_ids, pixel_values, max_new_tokens=new_tokens))  # the decode path
        identical += generated == answer
        free_agree += sum(a == b for a, b in zip(answer, generated))  # position by position, no realignment
        free_count += max(len(answer), len(generated))
        say(f"int{bits}:    -> {model.tokenizer.decode(generated)!r}")
    report = dict(settings=settings, speed_up=notes, kl=kl / max(1, count), top1_agreement=agree / max(1, count),
                  positions=count, free_run_agreement=free_agree / max(1, free_count), identical_answers=identical,
                  weight_error={kind: sum(v) / len(v) for kind, v in sorted(errors.items())})
    log_report(report, len(references), log)
    return report


def layer_type(name):
    """'llm.layers.3.mlp.fc1' -> 'fc1', 'vision.layers.0.self_attn.q_proj' -> 'vision q_proj'."""
    kind = name.rsplit(".", 1)[-1]
    return f"{name.split('.', 1)[0]} {kind}" if name.startswith(("vision.", "connector.")) else kind


def log_report(report, answers, log):
    s = report["settings"]
    log("relative weight error ||W - deq(W)|| / ||W||, mean per layer type:")
    for kind, value in report["weight_error"].items():
        log(f"  {kind:24s} {value:.4f}")
    name = f"int{s['bits']}" + (f" {s['scheme']} G={s['group_size']}" if s["bits"] == 4 else "") \
        + (" --vision" if s["include_vision"] else "") + (f" ({report['speed_up']})" if report["speed_up"] else "")
    log(f"{name}: greedy tokens equal to float32's at {100 * report['top1_agreement']:.2f}% of {report['positions']} "
        f"answer positions teacher-forced, {100 * report['free_run_agreement']:.2f}% free-running; identical answers "
        f"{report['identical_answers']}/{answers}; KL {report['kl']:.2e} nats")


# ----------------------------------------------------------------------------------------------------------------
# 6. The command line.


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every nanoImp program: not argparse's usage block
        print(f"quant.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_arguments(argv):
    parser = Parser(
        description="Weight-only int8/int4 quantization of an Imp checkpoint folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  python quant.py --model imp-v1-3b --bits 4 --vision --out imp-int4       # 1.91 GB: the small one
  python quant.py --model imp-v1-3b --bits 4 --out imp-int4-textonly       # vision kept in float16: 2.50 GB
  python quant.py --model imp-v1-3b --bits 4 --scheme asymmetric --group-size 64 --vision --out imp-int4-asym
  python quant.py --model imp-v1-3b --bits 8 --out imp-int8
  python quant.py --eval --model imp-v1-3b --bits 8                        # agreement and KL vs float32
  python quant.py --eval --model checkpoints/demo --bits 4 --data data/shapes/test.json --limit 200
  python quant.py --eval --model checkpoints/demo --bits 4 --vision --int8-activations --data data/shapes/test.json
The output folder loads like any other: python infer.py --model imp-int4 (in Python: quant.load("imp-int4"))""")
    parser.add_argument("--model", required=True, help="an Imp folder (official layout, either naming)")
    parser.add_argument("--out", help="output folder (convert mode): a new folder, never the input")
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
    parser.add_argument("--group-size", type=int, choices=SUPPORTED_GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                        help="int4 only: weights per scale (and zero) along the input dimension")
    parser.add_argument("--scheme", choices=SCHEMES, default="symmetric",
                        help="int4 only: symmetric (scale only, 4.5 bits/weight at G=32; default) or asymmetric "
                             "(scale and zero point, 5.0 bits/weight at G=32, more accurate)")
    parser.add_argument("--vision", action="store_true", help="also quantize the vision tower and the connector")
    parser.add_argument("--eval", action="store_true", help="report fidelity vs float32 instead of converting")
    parser.add_argument("--int8-activations", action="store_true",
                        help="with --eval: run the quantized model's large inputs (prefill, vision) with int8 "
                             "activations (kernels.py)")
    parser.add_argument("--data", help="with --eval: a LLaVA-format JSON whose questions to use (default: 5 built in)")
    parser.add_argument("--image-folder", help="with --data: image paths are relative to this (default: its folder)")
    parser.add_argument("--limit", type=int, help="with --data: only the first N records")
    args = parser.parse_args(argv)
    if not args.eval and not args.out:
        parser.error("--out is required to convert (or pass --eval)")
    if args.int8_activations and not args.eval:
        parser.error("--int8-activations only goes with --eval (it is a runtime setting, not stored in the file)")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        if args.eval:
            import kernels  # the command line is a program: it runs the quantized model as users do, fast
            samples = load_samples(args.data, args.image_folder, args.limit) if args.data else None
            evaluate(args.model, args.bits, args.group_size, args.vision, samples=samples, scheme=args.scheme,
                     speed_up=lambda model: kernels.enable(model, int8_activations=args.int8_activations and "always"))
        else:
            convert(args.model, args.out, args.bits, args.group_size, args.vision, scheme=args.scheme)
    except (ValueError, OSError, KeyError, imp.CheckpointError) as error:  # ImageError, NotFiniteError: ValueErrors
        print(f"quant.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Through the module `quant`, not this `__main__` copy of it: kernels.py's isinstance checks see quant's classes.
    import quant
    quant.main()
