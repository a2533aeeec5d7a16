"""
quant.py: weight-only int8 and int4 quantization for nanoImp. Activations stay in floating point (unless int8
activations are switched on for large inputs: set_int8_activations, section 2b).

    python quant.py --model imp-v1-3b --bits 4 --vision --out imp-int4     # 1.91 GB: int4 symmetric, groups of 32
    python quant.py --model imp-v1-3b --bits 8 --out imp-int8              # 3.60 GB
    python quant.py --eval --model imp-v1-3b --bits 4                      # fidelity vs float32

int8 (per output channel, symmetric): row n of W [N, K] gets scale[n] = max|W[n]| / 127 and stores
    q = round(W / scale) in -127..127 (int8). Decode: w = q * scale.
int4 (groups of G = 32, 64 or 128 consecutive weights along K). Both schemes store codes q in 0..15 and decode as
    w = (q - 8) * scale + zero, which is exactly what torch's packed int4 CPU kernel computes.
    symmetric (the default, llama.cpp's Q4_0): one scale per group, no stored zero (the kernel gets zero = 0).
        scale = m / -8, where m is the group's weight of largest magnitude, sign included, so m itself gets code
        0 (q - 8 = -8) and all 16 codes are used; q = clamp(round(w / scale), -8, 7) + 8. Every |w| <= |m|, so
        w / scale lies in [-8, 8] (-8.03 on m's side with the rounding of the scale to 8 bits, below; where that
        rounding would put a far-side weight past +8, that group's scale is rounded up instead): the clamp only
        touches weights on the far side within half a step of |m|, which then err by up to one step |scale|
        instead of half.
        Why / -8 and not absmax / 7 (no clamping, but code 0 unused): the step is 7/8 as large, and measured on
        Gaussian and heavy-tailed groups the RMS error is 11% lower. 4.5 bits per weight at G = 32.
    asymmetric (--scheme asymmetric): min/max, scale = (max - min) / 15 and zero = min + 8 * scale (the value code
        8 decodes to; where rounding the zero to 8 bits moves it too far, a slightly larger scale keeps min and max
        within half a step of the end levels, so no weight errs by more than half a step). A symmetric grid is
        centred on 0, so a group that leans to one side wastes levels; min/max puts all 16 on the range the group
        really has: at the same G its RMS error is 9% lower than symmetric's on Gaussian groups and 21% lower on
        heavy-tailed (Student-t, 3 dof) ones, at the price of a second 16-bit number: 5.0 bits per weight at
        G = 32, which makes the --vision file 2.09 GB, over the 2.0 GB budget.
        At equal bytes (symmetric G = 32 vs asymmetric G = 64, both 4.5 bits) symmetric is 3-4% more accurate on
        both kinds of groups: hence the default. Asymmetric G = 32 is the option for accuracy over size.

Our own on-disk format (safetensors; the packed kernels' tile layouts are private and have changed between torch
releases, so they are built at load time only and never saved). For a Linear named <m>:
    <m>.qweight  int8 [N, K] (8 bits), or uint8 [N, Kp / 2] (4 bits; Kp = K rounded up to a multiple of G):
                 byte j of a row holds column 2j in its LOW 4 bits and column 2j+1 in its HIGH 4 bits.
    <m>.scales   float16 [N] (8 bits) or [N, Kp / G] (4 bits; may be negative in the symmetric scheme)
    <m>.zeros    float16 [N, Kp / G]  (4 bits, asymmetric scheme only; a symmetric file must not have it)
    <m>.bias     unchanged (a float parameter)
float16, not bfloat16, for scales and zeros: same 2 bytes, 3 more mantissa bits, and weight scales (1e-5 .. 10) sit
far inside its range; quantize_* refuse anything that overflows. The int4 ones are nevertheless rounded to numbers
bfloat16 holds exactly too (kernel_exact: 8 significant bits; the RMS error moves by < 0.1% of itself), so
that in memory they can live in the int4 kernel's bfloat16 pairs alone; older files, whose int4 scales have 11
bits, load as before (and keep them beside the pairs). The settings live in config.json under
"quantization" (see quantization_config) and in the safetensors metadata. When K is not a multiple of G (SigLIP's
fc2: K = 4304 = 134.5 * 32) the weight is padded with zero columns up to Kp; dequantize() drops them again and the
fast path pads the activations with zeros.

Policy (quantization_plan):
    decoder Linears (q/k/v/dense, fc1, fc2) -> `bits`          the bulk: 2.52 B of Phi-2's 2.78 B parameters
    lm_head                                 -> int8 per row    its errors land directly on the logits
    embed_tokens                            -> int8 per row    a lookup: saves size only, nearly lossless
    vision tower and connector Linears      -> `bits` with --vision, else kept in float
    norms, biases, patch/position embeddings -> kept in float   tiny, and LayerNorms are sensitive
Imp-3B file sizes, exact from the shapes (GB = 1e9 bytes; float tensors in float16; per weight int8 costs
1 + 2/K bytes, int4 symmetric 0.5 + 2/G, asymmetric 0.5 + 4/G; README.md has the table per part):
    float16 everything 6.37 | --bits 8: 3.60, with --vision 3.19
    --bits 4 (G=32)   symmetric 2.49, asymmetric 2.65       (the float16 vision tower is 0.81 GB of it)
    --bits 4 --vision symmetric G=32 1.91, G=64 1.82, G=128 1.78 | asymmetric G=32 2.09, G=64 1.91, G=128 1.82
    e.g. symmetric G=32 --vision: decoder Linears 2.516 B x 0.5625 B = 1.416 + lm_head 0.131 + embedding 0.131
         + vision 0.232 (405 M x 0.5625 = 0.228, plus 2 M float16 values) + float16 norms and biases 0.002 = 1.912

Runtime paths of QuantLinear.forward:
    readable  dequantize the weight to the activation dtype, then F.linear (a slice of output rows at a time for
              large weights: SLICE_WEIGHTS). The reference; used for prefill.
    fast      torch's packed CPU kernels. They are fast only with bfloat16 activations (with float32 ones 4-20x
              slower than a float32 F.linear), so the fast path casts the activations to bfloat16 and the result
              back: a 2^-9 relative rounding, far below the quantization error itself. Used up to
              FAST_PATH_MAX_ROWS rows (decode); for more rows dequantize + F.linear wins.
    int8 activations (opt-in, set_int8_activations(model, True); infer.py / quant.py --eval --int8-activations,
              bench.py --dtypes int4+a8): for more than FAST_PATH_MAX_ROWS rows, the activations are quantized
              to int8 per row at each call and multiplied with int8 weights by torch._int_mm (VNNI): 2-3.5x faster
              than float32 F.linear on prefill / vision shapes here, at ~1% relative error of the output.
In memory, each weight is held once: the int8 kernel reads our int8 qweight as it is, and the int4 kernel's
reordered copy of the codes replaces qweight (prepare_fast_path; the readable path and saving read the codes back
out of it with codes_from_kernel_layout, after checking exactly that this gives them back). Likewise its bfloat16
(scale, zero) pairs replace the float16 scales and zeros when they give them back bit for bit (kernel_exact): an
int4 layer then holds 0.5 bytes per weight + 4 per group (0.625 bytes per weight at G = 32; the file: 0.5625 for
symmetric, the pairs also carry its zeros), and saving rebuilds the file's tensors from what it holds.
"""

import argparse
import functools
import json
import math
import os
import sys
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_VERSION = 1
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SCHEMES = ("symmetric", "asymmetric")  # of the int4 layers; int8 is always symmetric per row
DEFAULT_GROUP_SIZE = 32
SCALE_DTYPE = torch.float16   # scales and zeros on disk
KERNEL_DTYPE = torch.bfloat16  # the activation dtype the packed kernels are fast with
# Up to this many rows (tokens) the packed kernels beat dequantize + F.linear. Measured on fc1 (2560 -> 10240),
# float32 model, 2 cores: the packed path costs ~2 ms per row, dequantizing costs 100-300 ms per call whatever the
# rows, so they cross at ~130 rows (int8) and ~250 (int4). Decode has 1 row, an image prompt ~770: 64 keeps a
# margin on both sides.
FAST_PATH_MAX_ROWS = 64
# Large weights are handled a slice of rows at a time, at most this many weights (32 MB in float32) per slice:
# dequantizing (the readable path), quantizing, measuring the error. Every scale belongs to one row, so slicing
# changes no result, only the size of the float32 temporaries (Imp-3B's lm_head whole: 524 MB each).
SLICE_WEIGHTS = 2**23


_scratch = threading.local()  # per thread: {(purpose, dtype, device): a flat tensor}; see scratch()


def scratch(purpose, numel, dtype, device):
    """A flat tensor of `numel` elements that is the same memory at every call with the same purpose, dtype and
    device (from the same thread; grown when too small): for a temporary that is dead before the next call.
    The readable path dequantizes every weight of a prefill into one (QuantLinear.forward_readable): ~600 MB
    of 6-32 MB temporaries per Imp-3B layer otherwise go through malloc, whose freed heap blocks glibc keeps
    and cannot always reuse for the next size, which raised the peak RSS of a query by 0.06-0.19 GB, varying
    from run to run (handing them back to the OS at once would cost a page fault per 4 kB on the next use)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    # (one made in inference mode cannot be written outside it: a separate one for each)
    key = (purpose, dtype, torch.device(device), torch.is_inference_mode_enabled())
    if key not in buffers or buffers[key].numel() < numel:
        buffers.pop(key, None)  # the old one is freed before the larger one is made
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel]


def row_slices(rows, columns, multiple=64):
    """(start, end) pairs covering `rows`, each at most SLICE_WEIGHTS / columns rows (rounded down to `multiple`,
    so that int4 slices are whole blocks of the kernel's layout; at least `multiple`)."""
    step = max(multiple, SLICE_WEIGHTS // columns // multiple * multiple)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def in_row_slices(quantize, weight, *settings):
    """quantize(weight, *settings), one slice of rows at a time; the same tensors as one call on the whole weight."""
    parts = [quantize(weight[start:end], *settings) for start, end in row_slices(*weight.shape)]
    return parts[0] if len(parts) == 1 else tuple(torch.cat(tensors) for tensors in zip(*parts))


# ----------------------------------------------------------------------------------------------------------------
# 1. The math: quantize and dequantize one weight matrix, readable first.


def quantize_int8(weight):
    """weight [N, K] float -> (qweight int8 [N, K], scales float16 [N]). |w - q * scale| <= scale / 2."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).to(SCALE_DTYPE)  # [N]
    check_finite("scales", scales)
    safe = scales.float().masked_fill(scales == 0, 1.0)  # an all-zero row: q = 0, any scale decodes it exactly
    # Round with the *stored* (float16) scale, so that encoding and decoding use the very same number.
    qweight = torch.round(weight / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return qweight, scales


def dequantize_int8(qweight, scales, out=None):
    """[N, K] float32 (int8 * float32 promotes to float32 in one pass), written into `out` if given."""
    return torch.mul(qweight, scales.float()[:, None], out=None if out is None else out.view(qweight.shape))


def quantize_int4(weight, group_size=DEFAULT_GROUP_SIZE, scheme="symmetric"):
    """weight [N, K] float -> (qweight uint8 [N, Kp/2], scales float16 [N, Kp/G]), plus zeros float16 [N, Kp/G]
    for the asymmetric scheme. Codes q in 0..15 decode as (q - 8) * scale + zero (zero = 0 when symmetric)."""
    check_settings(4, group_size, scheme)
    out_features, in_features = weight.shape
    padded = padded_in_features(in_features, 4, group_size)
    weight = F.pad(weight.float(), (0, padded - in_features))  # zero columns; dropped again by dequantize
    groups = weight.view(out_features, padded // group_size, group_size)  # [N, Kp/G, G]
    # Scales and zeros are rounded to numbers that float16 (the file) and bfloat16 (the kernel's pairs) both hold
    # exactly (kernel_exact: 8 significant bits, so a scale moves by up to 2^-8 of itself instead of float16's
    # 2^-11), so that a layer can keep them once, in the kernel's pairs (prepare_fast_path). Where that rounding
    # would let a weight err by more than before, the step is rounded up instead (below): no bound changes.
    if scheme == "symmetric":  # scale = the largest-magnitude weight / -8, so that it gets code 0
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))[..., 0]  # [N, Kp/G], sign kept
        scales, zeros = kernel_exact(extreme / -8), None
        # A weight of the far side within 2^-8 of |extreme| may then lie past 8 steps, and the clamp at +7 would
        # cost it more than one step: in such (rare) groups round the magnitude of the scale up, so |w / scale| <= 8.
        far = (groups / scales.float().masked_fill(scales == 0, 1.0)[..., None]).amax(dim=-1) > 8
        if far.any():
            larger = kernel_exact(extreme.abs() / 8, round_up=True) * -torch.sign(extreme).to(SCALE_DTYPE)
            scales = torch.where(far, larger, scales)
    else:  # asymmetric: 16 levels from min to max; code 8 decodes to `zero`
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, Kp/G]
        zeros = kernel_exact(low + 8 * (high - low) / 15)
        check_finite("zeros", zeros)
        # The rounded zero moved by up to 2^-8 of itself, which matters when a group lies far from 0 relative to
        # its range (or is constant): then take the smallest step, rounded up, that keeps low and high within
        # half a step of the end levels zero - 8 * scale and zero + 7 * scale, so the clamp costs no weight more.
        zero = zeros.float()
        needed = kernel_exact(torch.maximum((zero - low) / 8.5, (high - zero) / 7.5), round_up=True)
        scales = torch.maximum(kernel_exact((high - low) / 15), needed)
        groups = groups - zero[..., None]
    check_finite("scales", scales)
    safe = scales.float().masked_fill(scales == 0, 1.0)  # a constant group: every q = 8 decodes to zero (or 0)
    # Round with the *stored* numbers; the clamp is what keeps q in 0..15 (see the file docstring).
    q = (torch.round(groups / safe[..., None]) + 8).clamp(0, 15).to(torch.uint8).view(out_features, padded)
    return (pack_int4(q), scales) + (() if zeros is None else (zeros,))


def kernel_exact(values, round_up=False):
    """float32 values -> float16 ones that bfloat16 holds exactly too: rounded to bfloat16's 8 significant bits
    (to the nearest, or with round_up to the next one at or above: for values >= 0), then stored as float16.
    From 2^-17 to 65504 that is the bfloat16 number itself (float16's subnormals keep 8 bits down to 2^-17).
    Below 2^-17 float16 keeps fewer bits than bfloat16: the float16 rounding of it, which then has at most 8
    significant bits, so it is again exact in both. Past 65504 the result is inf (check_finite refuses it).
    The int4 kernel wants bfloat16 (scale, zero) pairs; with numbers like these the file's float16 scales are
    rebuilt from them bit for bit, and a layer need not keep both (prepare_fast_path checks it, per layer). The
    cost: a scale moves by up to 2^-8 of itself instead of float16's 2^-11, far below the step's own rounding
    error."""
    rounded = values.to(KERNEL_DTYPE)
    if round_up:  # for a positive number the next bfloat16 up is the next bit pattern
        rounded = torch.where(rounded.float() < values, (rounded.view(torch.int16) + 1).view(KERNEL_DTYPE), rounded)
    return rounded.to(SCALE_DTYPE)


def same_bits(a, b):
    """a and b hold the same float16 numbers, bit for bit (-0.0 is not 0.0 here: a file keeps the sign)."""
    return a.shape == b.shape and torch.equal(a.to(SCALE_DTYPE).view(torch.int16), b.view(torch.int16))


def dequantize_int4(qweight, scales, zeros, group_size, in_features):
    """zeros: None for the symmetric scheme. Returns the float32 weight [N, K]."""
    return dequantize_int4_codes(unpack_int4(qweight), scales, zeros, group_size, in_features)


def dequantize_int4_codes(q, scales, zeros, group_size, in_features, out=None):
    """The same from the unpacked codes q [N, Kp] (uint8, values 0..15), whichever layout they were kept in;
    written into `out` (N * Kp float32 elements) if given."""
    out_features, padded = q.shape
    groups = q.view(out_features, padded // group_size, group_size)  # [N, Kp/G, G]
    scales = scales.float()[..., None]  # [N, Kp/G, 1]
    offset = -8 * scales if zeros is None else zeros.float()[..., None] - 8 * scales
    # w = (q - 8) * scale + zero, written as q * scale + (zero - 8 * scale): one fused pass over the big tensor,
    # in place on the codes cast to float32 (given the uint8 codes, addcmul would cast them into a second float32
    # temporary of the weight's size beside its result: +4 bytes per weight at the peak of every prefill Linear)
    weight = groups.to(torch.float32) if out is None else out.view(groups.shape).copy_(groups)  # [N, Kp/G, G]
    torch.addcmul(offset, weight, scales, out=weight)
    return weight.view(out_features, padded)[:, :in_features]  # [N, K], padding dropped


def pack_int4(q):
    """[N, K] values 0..15 (K even) -> [N, K/2] uint8: column 2j in the low nibble, column 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed):
    """[N, K/2] uint8 -> [N, K] uint8 values 0..15 (the inverse of pack_int4)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def padded_in_features(in_features, bits, group_size):
    return in_features if bits == 8 else -(-in_features // group_size) * group_size


def aligned(tensor):
    """`tensor`, or a contiguous copy of it if its data does not start on a 64-byte boundary. The int8 kernel
    crashes (segmentation fault, torch 2.13) on weights or activations that are not at least 16 / 32-byte aligned,
    which is what a view into a safetensors file or a slice of a larger tensor can be. Fresh tensors are 64-aligned."""
    if tensor.is_contiguous() and tensor.data_ptr() % 64 == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


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


@functools.cache
def _libc():
    import ctypes
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to do
        return None


def give_back_freed_memory():
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere). glibc serves blocks below its
    mmap threshold (which rises to 32 MB once such a block is freed) from the heap, and only trims the heap's top
    by itself. The converter keeps every small output and frees large temporaries between them, so without this
    the freed holes pile up: converting Imp-3B (1.9 GB out) reached 4-10 GB of RSS, varying from run to run."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# ----------------------------------------------------------------------------------------------------------------
# 2. The packed CPU kernels: private ATen ops whose signatures have changed between torch releases, so they are
#    tried once on a tiny matrix and compared with the readable path; any failure means "use the readable path".


@functools.cache
def packed_kernels_available() -> dict:
    """{8: bool, 4: bool}: which packed kernels run here and give the right numbers (e.g. none on some builds)."""
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(16, 64, generator=generator), torch.randn(2, 64, generator=generator).to(KERNEL_DTYPE)
    available = {}
    for bits in SUPPORTED_BITS:
        try:  # asymmetric: non-zero zero points, so that the check covers both halves of the (scale, zero) pairs
            layer = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), bits, 32, scheme="asymmetric")
            with torch.no_grad():
                layer.load_quantized(weight)
            got, want = layer.forward_fast(x).float(), layer.forward_readable(x).float()
            available[bits] = bool(torch.allclose(got, want, rtol=0.05, atol=0.05))
        except Exception:  # RuntimeError, NotImplementedError, AttributeError (op missing): all mean "no"
            available[bits] = False
    return available


# The int4 kernel's weight layout, and its inverse. torch's converter (_convert_weight_to_int4pack_for_cpu) takes
# the codes as int32 [N, K] and returns uint8 [N, K/2]: as many bytes as our qweight, in another order. Keeping
# both would hold every int4 weight twice (~1.46 GB for Imp-3B), so once the kernel's copy exists it is the only
# one: the readable path and saving read the codes back out of it with codes_from_kernel_layout below.
# The order is private and depends on the CPU's vector width (aten/src/ATen/native/cpu/int4mm_kernel.cpp in
# torch 2.13, confirmed by converting known codes): the N rows are cut into blocks of B rows, each block stored
# column by column, [K, B/2] bytes per block, two rows per byte:
#     "halves": byte j of a column holds row j in its low nibble and row j + B/2 in its high one (one vector load
#               of a column gives the AVX-512 / AVX2 kernel one half of the block's rows per nibble)
#     "pairs":  byte j holds rows 2j (low) and 2j + 1 (high); the last block, when N is not a multiple of B
#               (16, 32 or 48 rows), is always stored like this, and so is every block without vector units.
# Since that is an observation, not an interface, int4_kernel_layout() checks it once per process on random
# codes, and prepare_fast_path checks it again on each real layer; if either check fails, the layer keeps our
# qweight beside the kernel's copy (what every layer did before): more memory, never a wrong weight.
INT4_KERNEL_LAYOUTS = {"avx512": (64, "halves"), "avx2": (32, "halves"), "scalar": (32, "pairs")}


def codes_from_kernel_layout(packed, out_features, layout, out=None):
    """The kernel's uint8 [N, Kp/2] -> our codes [N, Kp] (uint8, 0..15), for layout = (B, "halves" or "pairs");
    written into `out` (N * Kp uint8 elements) if given."""
    block, order = layout
    padded = packed.shape[1] * 2  # Kp
    flat = packed.reshape(-1)
    codes = torch.empty(out_features, padded, dtype=torch.uint8) if out is None else out.view(out_features, padded)
    full_rows = out_features // block * block

    def unpack_block(tiles, rows, order):  # tiles [..., Kp, R/2] bytes -> rows [..., R, Kp] codes
        size = rows.shape[-2]
        low_rows, high_rows = (rows[..., :size // 2, :], rows[..., size // 2:, :]) if order == "halves" else \
                              (rows[..., 0::2, :], rows[..., 1::2, :])
        pairs = tiles.transpose(-1, -2).contiguous()  # [..., R/2, Kp]: one byte per pair of rows, along K
        torch.bitwise_and(pairs, 0x0F, out=low_rows)  # written in place through the strided views of `codes`
        torch.bitwise_right_shift(pairs, 4, out=high_rows)

    if full_rows:  # all full blocks at once: [N/B, Kp, B/2] bytes -> [N/B, B, Kp] codes
        tiles = flat[:full_rows * padded // 2].view(-1, padded, block // 2)
        unpack_block(tiles, codes[:full_rows].view(-1, block, padded), order)
    if full_rows < out_features:  # the partial last block: pairs
        unpack_block(flat[full_rows * padded // 2:].view(padded, -1), codes[full_rows:], "pairs")
    return codes


@functools.cache
def int4_kernel_layout():
    """The INT4_KERNEL_LAYOUTS name whose inverse undoes torch's int4 converter here, exactly, or None."""
    generator = torch.Generator().manual_seed(0)
    # Every number of rows 16 .. 160 (multiples of 16: what the kernel takes): full blocks of 32 and 64 and every
    # partial last block; K = 96, three groups of 32, not a power of two.
    probes = [torch.randint(0, 16, (rows, 96), generator=generator, dtype=torch.int32) for rows in range(16, 161, 16)]
    try:
        converted = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1) for q in probes]
    except Exception:  # no converter in this build (see packed_kernels_available)
        return None
    for name, layout in INT4_KERNEL_LAYOUTS.items():
        if all(p.dtype == torch.uint8 and tuple(p.shape) == (q.shape[0], q.shape[1] // 2)
               and torch.equal(codes_from_kernel_layout(p, q.shape[0], layout), q.to(torch.uint8))
               for p, q in zip(converted, probes)):
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------
# 2b. int8 activations (W8A8, opt-in): the large products of prefill and the vision tower as int8 x int8 GEMMs.
#
# Prefill (770 rows) and the vision tower (729 rows) are bound by arithmetic, not by memory: on a CPU without
# native bfloat16 dot products they run in float32 at ~120-170 GFLOP/s, whatever the weights are stored in. Its
# AVX-512 VNNI instructions (vpdpbusd) multiply 64 int8 pairs and add them into 16 int32 sums per instruction,
# 4x the float32 lanes of one FMA, and torch._int_mm (int8 [M, K] x int8 [K, N] -> int32 [M, N]) reaches them
# through oneDNN. Measured here (Intel Xeon, 2 threads, torch 2.13), float32 F.linear vs _int_mm:
#     fc1     770 x 2560 -> 10240    252 ms (160 GFLOP/s)   69 ms (589 GOPS)
#     fc2     770 x 10240 -> 2560    300 ms (135 GFLOP/s)   84 ms (483 GOPS)
#     q_proj  770 x 2560 -> 2560      63 ms (161 GFLOP/s)   16 ms (626 GOPS)
#     SigLIP  729 x 1152 -> 4304      43 ms (168 GFLOP/s)   11 ms (642 GOPS)
# For that the activations must be int8 too, quantized on the fly at every call ("dynamic"), one scale per row:
#     row_scale[m] = max|x[m]| / 127,   qx = round(x / row_scale)   (symmetric; -127..127)
# Per row (token) because activations vary far more between tokens than along one token's features: an outlier
# token then costs only its own precision, and the scale factors out of the row's dot products exactly,
#     y[m, n] = sum_k x[m, k] w[n, k] ~ row_scale[m] * channel_scale[n] * sum_k qx[m, k] qw[n, k],
# an int32 sum (|sum| <= K * 127 * 127 = 1.7e8 for K = 10240, far below 2^31), rescaled once per output.
# Error: each factor is rounded by at most half a step, 1/254 of its row's largest value (uniform rounding: RMS
# 1/(254 sqrt 3) = 0.23% of it); on Gaussian rows the relative error of y comes out near 1% (the tests' bound).
# That changes numbers (slightly), hence off by default: set_int8_activations(model, True) switches it on.
# int8 layers use their stored int8 qweight and per-row scales as they are. int4 layers have no int8 weight: each
# slice of output rows (row_slices, as the readable path) is dequantized to float32 and requantized per output
# row to int8 (QuantLinear.int8_weight), at every call: no second copy of the weights, at a cost measured there.


@functools.cache
def int8_matmul_available() -> bool:
    """Whether torch._int_mm runs here and gives the exact int32 products (checked once, on a tiny matrix). On this
    CPU build it takes any M, K, N (tried 1x1x1 .., odd sizes, unaligned data); on CUDA it wants M > 16 and K, N
    multiples of 8, which is one reason the int8-activation path is used on the CPU only."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (17, 72), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 72), generator=generator, dtype=torch.int8)
    try:
        got = torch._int_mm(a, b.t())
        return got.dtype == torch.int32 and torch.equal(got, (a.long() @ b.long().t()).int())
    except Exception:  # RuntimeError, NotImplementedError, AttributeError (op missing): all mean "no"
        return False


def set_int8_activations(model: nn.Module, enabled: bool = True) -> int:
    """Switch the int8-activation path of every QuantLinear in `model` on (or off again); returns how many layers
    it now applies to (0 when torch._int_mm does not work here: they then keep the readable path). It is used for
    inputs of more than FAST_PATH_MAX_ROWS rows; decode keeps the packed kernels."""
    layers = [module for module in model.modules() if isinstance(module, QuantLinear)]
    for layer in layers:
        layer.int8_activations = enabled
    return len(layers) if enabled and int8_matmul_available() else 0


ACTIVATION_CHUNK = 2**18  # activations quantized this many at a time: a 1 MB float32 temporary, in the L2 cache


def quantize_activations(x2d):
    """x [M, K] float -> (int8 [M, K] codes, float32 [M, 1] row scales), row_scale = max|row| / 127. The codes are
    written into scratch memory (valid until the next call): they live across the slices of one layer, no longer."""
    rows, columns = x2d.shape
    # max|x| as max(max x, -min x): two reductions that need no |x| temporary of the activations' size
    scale = torch.maximum(x2d.amax(dim=1), x2d.amin(dim=1).neg()).float().div_(127)[:, None]  # [M, 1]
    scale.masked_fill_(scale == 0, 1.0)  # an all-zero row: codes 0, any scale gives it back
    codes = scratch("a8 codes", rows * columns, torch.int8, x2d.device).view(rows, columns)
    # x / scale, rounded, a chunk of rows at a time: the float32 quotient of a whole fc2 input (770 x 10240) would
    # be 32 MB more at the peak of a prefill, and this way it stays in the cache between the three steps.
    step = max(1, ACTIVATION_CHUNK // columns)
    buffer = scratch("a8 chunk", step * columns, torch.float32, x2d.device)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        chunk = buffer[:(end - start) * columns].view(end - start, columns)
        scaled = torch.div(x2d[start:end], scale[start:end], out=chunk)
        codes[start:end].copy_(scaled.round_())  # |x / scale| <= 127 (+ rounding ulps): no clamp needed
    return codes, scale


def rescale_int32_(acc, row_scale, channel_scale, bias, out):
    """out = acc * row_scale[:, None] * channel_scale[None, :] (+ bias), in float32, in two passes over `out`
    (a strided column slice of the layer's output is fine): int32 x float32 promotes to float32 as it multiplies."""
    torch.mul(acc, channel_scale, out=out)
    if bias is None:
        return out.mul_(row_scale)
    return torch.addcmul(bias, out, row_scale, out=out)


# ----------------------------------------------------------------------------------------------------------------
# 3. Modules that hold the on-disk tensors as buffers, so `<module>.qweight` in a checkpoint fills `qweight`.


def describe(dtype, shape):
    return f"{str(dtype).replace('torch.', '')} {list(shape)}"


class QuantizedModule(nn.Module):
    """Shared by QuantLinear and QuantEmbedding: buffer checks, and a .to() that leaves the stored format alone."""

    def expected_buffers(self) -> dict:  # name -> (shape, dtype), defined by the subclasses
        raise NotImplementedError

    def register_expected_buffers(self, device):
        for name, (shape, dtype) in self.expected_buffers().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.kernel_tensors = None  # the packed kernels' private layout, built by prepare_fast_path, never saved
        self.kernel_layout = None   # an INT4_KERNEL_LAYOUTS name when the codes live only in kernel_tensors[0]
        self.kernel_holds = ()      # the buffers whose only copy is in kernel_tensors (dropped from _buffers)

    def stored_buffer(self, name):
        """Buffer `name` in our on-disk format: held, or rebuilt from the kernel's copy (QuantLinear)."""
        return self._buffers[name]

    def __getattr__(self, name):
        # `layer.scales` etc. still read as the on-disk tensor when only the kernel's copy is held: rebuilt (a new
        # tensor at each access; writing to it changes nothing). Checked only after the usual lookup fails.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.__dict__.get("kernel_holds", ()):
                return self.stored_buffer(name)
            raise

    def stored_bytes(self) -> int:
        """Bytes of the tensors this layer saves (qweight, scales, zeros, bias): its share of the file."""
        buffers = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.expected_buffers().values())
        return buffers + sum(p.numel() * p.element_size() for p in self._parameters.values() if p is not None)

    def resident_bytes(self) -> int:
        """Bytes this layer holds in memory: its buffers, bias and kernel layouts, each storage counted once."""
        tensors = [*self._parameters.values(), *self._buffers.values(), *(self.kernel_tensors or ())]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
        return sum(storages.values())

    def release_kernel_tensors(self):
        """Forget the kernels' layout (prepare_fast_path builds it again when needed). If it held the only copy of
        the int4 codes or scales, they first go back into their buffers, in the order registered in __init__ (the
        buffer order is state_dict's key order)."""
        if self.kernel_holds:
            buffers = {name: self.stored_buffer(name) for name in self.expected_buffers()
                       if name in self._buffers or name in self.kernel_holds}
            buffers.update(self._buffers)  # anything else (check_buffers names it) after them
            self._buffers.clear()
            self._buffers.update(buffers)
        self.kernel_tensors, self.kernel_layout, self.kernel_holds = None, None, ()

    def check_tensor(self, prefix, name, tensor):
        """One clear ValueError, naming the tensor, for anything that is not exactly the on-disk format."""
        expected = self.expected_buffers()
        if name not in expected:  # e.g. zero points for a layer whose config says scheme "symmetric"
            scheme = getattr(self, "scheme", None)
            raise ValueError(f"{prefix}{name}: unexpected; with bits={self.bits}, scheme={scheme} a layer stores only"
                             f" {', '.join(expected)} (the checkpoint does not match its config)")
        shape, dtype = expected[name]
        if tensor.is_meta:
            raise ValueError(f"{prefix}{name}: never loaded (still on the meta device)")
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{prefix}{name}: expected {describe(dtype, shape)}, "
                             f"got {describe(tensor.dtype, tensor.shape)}")

    def check_buffers(self, prefix=""):  # every buffer: also e.g. a `zeros` a loader assigned to a symmetric layer
        for name, tensor in self._buffers.items():
            self.check_tensor(prefix, name, tensor)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict would silently cast a float tensor into an int8 buffer: check first.
        for name in ("qweight", "scales", "zeros"):
            if prefix + name in state_dict:
                self.check_tensor(prefix, name, state_dict[prefix + name])
        self.release_kernel_tensors()  # the buffers take the new tensors; the kernel layout is rebuilt from them
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias, then the buffers held
        if self.kernel_holds:  # codes or scales held only in the kernel's layout: save them in our format, and
            for name in self.expected_buffers():  # every buffer in its registered order: the same keys, same order
                key = prefix + name
                destination[key] = destination.pop(key) if name not in self.kernel_holds else self.stored_buffer(name)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every floating-point buffer. Our float16 scales and zeros are part of the
        # stored format (and bfloat16 would lose 3 bits of them), so they may change device but never dtype.
        self.release_kernel_tensors()  # built for this device: rebuilt (by prepare_fast_path) after the move
        kept = {name: self._buffers.pop(name) for name in ("scales", "zeros") if name in self._buffers}
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.output_dtype))  # what .to() does to a float tensor: device and dtype
        for name, tensor in kept.items():
            self._buffers[name] = (torch.empty_like(tensor, device=probe.device) if tensor.is_meta
                                   else tensor.to(probe.device))
        self.output_dtype = probe.dtype
        return self


class QuantLinear(QuantizedModule):
    """A drop-in for nn.Linear with an int8 or int4 weight. group_size and scheme only matter for bits=4."""

    def __init__(self, in_features, out_features, bias: bool, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 device=None, dtype=None, scheme: str = "symmetric"):
        super().__init__()
        check_settings(bits, group_size, scheme)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size, self.scheme = (group_size, scheme) if bits == 4 else (None, None)
        self.output_dtype = dtype or torch.get_default_dtype()  # only used by .to() bookkeeping
        self.register_expected_buffers(device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    def expected_buffers(self):
        N, K = self.out_features, self.in_features
        if self.bits == 8:
            return {"qweight": ((N, K), torch.int8), "scales": ((N,), SCALE_DTYPE)}
        padded = padded_in_features(K, 4, self.group_size)
        groups = (N, padded // self.group_size)
        buffers = {"qweight": ((N, padded // 2), torch.uint8), "scales": (groups, SCALE_DTYPE)}
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
        tensors = in_row_slices(quantize_int8, weight) if self.bits == 8 else \
            in_row_slices(quantize_int4, weight, self.group_size, self.scheme)
        self.kernel_tensors, self.kernel_layout, self.kernel_holds = None, None, ()  # built from the old weight
        self._buffers.clear()  # refilled in the registered order, qweight, scales(, zeros): state_dict's key order
        self._buffers.update(zip(self.expected_buffers(), tensors))

    def codes(self, start=0, end=None, out=None):
        """int4 only: the codes of output rows start .. end-1 (default all), [rows, Kp] uint8 with values 0..15,
        unpacked from qweight or, if the kernel's layout holds the only copy, read back out of that (into `out`,
        if given)."""
        end = self.out_features if end is None else min(end, self.out_features)
        if self.kernel_layout is None:
            return unpack_int4(self.qweight[start:end])
        layout = INT4_KERNEL_LAYOUTS[self.kernel_layout]
        block = layout[0]
        if start % block or (end % block and end != self.out_features):
            raise ValueError(f"rows {start}..{end}: the kernel layout is read in whole blocks of {block} rows")
        # The kernel's [N, Kp/2] tensor stores each block of B rows in B rows' worth of bytes, so rows start .. end
        # of it are exactly the blocks of those output rows.
        return codes_from_kernel_layout(self.kernel_tensors[0][start:end], end - start, layout, out)

    def stored_buffer(self, name, start=0, end=None):
        """Buffer `name` (qweight, scales, zeros) of the on-disk format, output rows start .. end-1 (default all):
        the buffer itself, or rebuilt from the kernel's copy where that is the only one (kernel_holds)."""
        if name not in self.kernel_holds:
            return self._buffers[name] if start == 0 and end is None else self._buffers[name][start:end]
        if name == "qweight":
            return pack_int4(self.codes(start, end))
        # The kernel's [Kp/G, N, 2] bfloat16 (scale, zero) pairs: prepare_fast_path checked that these give our
        # float16 numbers back bit for bit
        pairs = self.kernel_tensors[1][:, start:end, 0 if name == "scales" else 1]  # [Kp/G, rows]
        return pairs.to(SCALE_DTYPE).t().contiguous()  # [rows, Kp/G]

    def dequantize(self, start=0, end=None, reuse=False):
        """The float32 weight [N, K] that this layer stands for, or its output rows start .. end-1 only. With
        `reuse`, it (and the int4 codes on the way) lives in scratch() memory that the next such call overwrites."""
        rows = (min(end, self.out_features) if end is not None else self.out_features) - start
        padded = padded_in_features(self.in_features, self.bits, self.group_size)
        device = self.kernel_tensors[1].device if self.kernel_holds else self.scales.device
        out = scratch("weight", rows * padded, torch.float32, device) if reuse else None
        if self.bits == 8:
            return dequantize_int8(self.qweight[start:end], self.scales[start:end], out)
        codes = self.codes(start, end, scratch("codes", rows * padded, torch.uint8, device) if reuse else None)
        zeros = self.stored_buffer("zeros", start, end) if self.scheme == "asymmetric" else None
        return dequantize_int4_codes(codes, self.stored_buffer("scales", start, end), zeros, self.group_size,
                                     self.in_features, out)

    int8_activations = False  # the opt-in int8-activation path for large inputs (set_int8_activations)

    def forward(self, x):  # x: (..., K) -> (..., N)
        rows = x.numel() // self.in_features
        if rows <= FAST_PATH_MAX_ROWS and self.fast_path_supported():
            return self.forward_fast(x)
        if self.int8_activations and self.int8_activations_supported(x):
            return self.forward_int8_activations(x)
        return self.forward_readable(x)

    def int8_weight(self, start=0, end=None):
        """int4 only: output rows start .. end-1 requantized to int8 per row, in scratch memory (valid until the
        next call): (codes int8 [rows, K], scales float32 [rows]), w ~ codes * scale, for _int_mm.
        The plain way, dequantize() and then quantize_int8, took 95 ms for Imp's fc1 (2560 -> 10240), more than the
        int8 GEMM itself (69 ms): eight passes over a float32 copy of the weight. Two things make it ~2x cheaper:
        - the row's largest |w| follows from its groups' (scale, zero) alone: a weight decodes to (q - 8) * scale +
          zero with q in 0..15, so |w| <= max(|zero - 8 scale|, |zero + 7 scale|) (symmetric: 8 |scale| exactly,
          the group's extreme weight has code 0). No pass over the weight to find it.
        - dividing the groups' scales and zeros by the row's int8 step first, dequantize_int4_codes writes the
          weight directly in units of that step (|value| <= 127): round it and cast, and it is the int8 code.
        Two roundings (to int4, then to the int8 grid) instead of one: the second moves a weight by at most half an
        int8 step, 1/254 of the row's largest weight: 1/32 of the int4 step of the row's largest group."""
        end = self.out_features if end is None else min(end, self.out_features)
        rows, padded = end - start, padded_in_features(self.in_features, 4, self.group_size)
        device = self.kernel_tensors[1].device if self.kernel_holds else self.scales.device
        scales = self.stored_buffer("scales", start, end).float()  # [rows, Kp/G]
        zeros = self.stored_buffer("zeros", start, end).float() if self.scheme == "asymmetric" else None
        if zeros is None:
            reach = 8 * scales.abs()  # [rows, Kp/G]: the largest |w| each group can decode to
        else:
            reach = torch.maximum((zeros - 8 * scales).abs(), (zeros + 7 * scales).abs())
        step = reach.amax(dim=1) / 127  # [rows]: the int8 step of each row
        step.masked_fill_(step == 0, 1.0)  # an all-zero row: codes 0 with any step
        buffer = scratch("codes", rows * padded, torch.uint8, device)
        codes = self.codes(start, end, buffer)
        zeros_in_steps = None if zeros is None else zeros / step[:, None]
        weight_out = scratch("weight", rows * padded, torch.float32, device)
        units = dequantize_int4_codes(codes, scales / step[:, None], zeros_in_steps, self.group_size, self.in_features,
                                      weight_out)
        # The int8 codes go where the int4 codes were (dead once dequantized): no third buffer of the slice's size.
        weight_codes = buffer.view(torch.int8)[:rows * self.in_features].view(rows, self.in_features)
        return weight_codes.copy_(units.round_()), step  # |units| <= 127 up to rounding ulps: no clamp needed

    @staticmethod
    def int32_scratch(rows, columns):  # _int_mm's int32 sums: dead once rescaled into the output
        return scratch("a8 sums", rows * columns, torch.int32, "cpu").view(rows, columns)

    def int8_activations_supported(self, x) -> bool:
        # On the CPU only (see int8_matmul_available), and not where autograd needs a gradient through x: the
        # rounding has none (LoRA-style training on a frozen quantized base keeps the readable path).
        return (x.device.type == "cpu" and int8_matmul_available()
                and not (torch.is_grad_enabled() and x.requires_grad))

    def forward_int8_activations(self, x):
        """W8A8: int8 activations (one scale per row, quantized at this call) times int8 weights (one scale per
        output row) with torch._int_mm, rescaled to float32; see section 2b. bits=8: the stored qweight and scales
        as they are. bits=4: a slice of output rows at a time (row_slices, as forward_readable) dequantized to
        float32 and requantized to int8 per output row (int8_weight), all in scratch memory."""
        x2d = x.reshape(-1, self.in_features)
        codes, row_scale = quantize_activations(x2d)
        out = torch.empty(x2d.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        bias = None if self.bias is None else self.bias.float()
        scales = self.scales.float() if self.bits == 8 else None
        # A slice of output rows at a time (as forward_readable), so that the int32 sums stay small too.
        for start, end in row_slices(self.out_features, self.in_features):
            if self.bits == 8:  # the stored int8 weight and its per-row scales, as they are
                weight_codes, channel_scale = self.qweight[start:end], scales[start:end]
            else:
                weight_codes, channel_scale = self.int8_weight(start, end)  # int8 [rows, K], float32 [rows]
            # _int_mm wants the weight as [K, N]: the transposed view of our row-major [N, K] (column-major, the
            # layout oneDNN's int8 GEMM read fastest here; a contiguous [K, N] copy was no faster)
            acc = torch._int_mm(codes, weight_codes.t(), out=self.int32_scratch(x2d.shape[0], end - start))
            rescale_int32_(acc, row_scale, channel_scale, None if bias is None else bias[start:end],
                           out[:, start:end])
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def forward_readable(self, x):
        """Dequantize, then F.linear. A float copy of the weight is never kept, and a large one is never made whole
        either: SLICE_WEIGHTS weights (a slice of output rows) at a time, which cuts the prefill's peak memory
        (fc1: four 2560-row slices of 26 MB instead of 105 MB at once) at no measurable cost in time."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        slices = row_slices(self.out_features, self.in_features)
        # Without autograd (generation), the dequantized weight lives in scratch memory, reused by every call: it is
        # dead once F.linear returns. With autograd, F.linear may keep it for the backward pass: a fresh tensor.
        reuse = not torch.is_grad_enabled()
        if len(slices) == 1:
            return F.linear(x, self.dequantize(reuse=reuse).to(x.dtype), bias)
        if not reuse:  # autograd does not go through out= ops: the slices' products, then one torch.cat of them
            return torch.cat([F.linear(x, self.dequantize(start, end).to(x.dtype),
                                       None if bias is None else bias[start:end]) for start, end in slices], dim=-1)
        # Each slice's product goes straight into its columns of one output, allocated once the first slice is
        # dequantized (fc1 at 770 prefill rows: 32 MB, held once; no list of pieces and torch.cat copy of them).
        x2d, out = x.reshape(-1, self.in_features), None
        for start, end in slices:
            weight = self.dequantize(start, end, reuse).to(x.dtype).t()
            out = x.new_empty(x2d.shape[0], self.out_features) if out is None else out
            if bias is None:
                torch.mm(x2d, weight, out=out[:, start:end])
            else:
                torch.addmm(bias[start:end], x2d, weight, out=out[:, start:end])
            del weight
        return out.view(*x.shape[:-1], self.out_features)

    def fast_path_supported(self) -> bool:
        # Shape limits, measured on torch 2.13 (every Linear of Imp meets them): the int4 kernel refuses N that is
        # not a multiple of 16, and the int8 kernel returns NaN or crashes when K is not a multiple of 16.
        scales = self.kernel_tensors[1] if "scales" in self.kernel_holds else self.scales
        return (scales.device.type == "cpu" and packed_kernels_available()[self.bits]
                and self.in_features % 16 == 0 and (self.bits == 8 or self.out_features % 16 == 0))

    def prepare_fast_path(self):
        """Build the kernels' private layout from the on-disk buffers, once (at load time, or at the first call).

        int8: the kernel reads our int8 [N, K] weight as it is: one copy, shared.
        int4: the converter reorders the codes. When the order is one that codes_from_kernel_layout undoes, checked
        exactly on this very layer, the kernel's copy becomes the only one and the `qweight` buffer is dropped
        (0.5 bytes per weight); codes() and stored_buffer() read the codes back out of it. Otherwise both stay.
        The scales likewise: the kernel wants bfloat16 (scale, zero) pairs (its float16 variant runs a scalar loop
        on x86, 10-60x slower). quantize_int4 rounds every scale and zero to a number both float16 and bfloat16
        hold exactly (kernel_exact), so the pairs give the float16 `scales` (and `zeros`) back bit for bit:
        checked exactly on this layer, and then those buffers are dropped too (2 or 4 bytes per group). A file
        whose scales bfloat16 does not hold (written by an older quant.py) keeps them beside the pairs."""
        if self.kernel_tensors is not None:
            return self.kernel_tensors
        if self.bits == 8:  # scales must have the activations' dtype
            self.qweight = aligned(self.qweight)  # same values, so the stored format is unchanged
            self.kernel_tensors = (self.qweight, self.scales.to(KERNEL_DTYPE))
            return self.kernel_tensors
        codes = unpack_int4(self.qweight)  # [N, Kp] uint8: the converter takes int32 codes, not packed bytes
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)  # innerKTiles: unused
        # The kernel decodes (q - 8) * scale + zero from [Kp/G, N, 2] (scale, zero) pairs; symmetric: zero = 0.
        zeros = self.zeros if self.scheme == "asymmetric" else torch.zeros_like(self.scales)
        scales_and_zeros = torch.stack((self.scales, zeros), dim=-1).transpose(0, 1)  # [Kp/G, N, 2]
        self.kernel_tensors = (packed, scales_and_zeros.contiguous().to(KERNEL_DTYPE))
        layout = int4_kernel_layout()
        if layout and torch.equal(codes_from_kernel_layout(packed, self.out_features, INT4_KERNEL_LAYOUTS[layout]),
                                  codes):
            del self._buffers["qweight"]
            self.kernel_layout, self.kernel_holds = layout, ("qweight",)
        del codes
        pairs = self.kernel_tensors[1]
        if all(same_bits(pairs[..., index].t(), self._buffers[name])
               for index, name in enumerate(("scales", "zeros")) if name in self._buffers):
            for name in ("scales", "zeros"):
                if name in self._buffers:
                    del self._buffers[name]
                    self.kernel_holds += (name,)
        return self.kernel_tensors

    def forward_fast(self, x):  # only where fast_path_supported(); forward() checks
        # A decode step calls this ~190 times for Imp-3B, so every operation counts (~5 us each): no pad that pads
        # nothing, and the bias add also casts the output back (bfloat16 + float32 -> float32), in one operation.
        weight, scales = self.kernel_tensors or self.prepare_fast_path()  # built once, then reused
        x2d = aligned(x.reshape(-1, self.in_features).to(KERNEL_DTYPE))  # (M, K): the kernels take 2-D inputs only
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x2d, weight, scales)
        else:
            padding = padded_in_features(self.in_features, 4, self.group_size) - self.in_features
            if padding:
                x2d = F.pad(x2d, (0, padding))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, weight, self.group_size, scales)
        y = y.view(*x.shape[:-1], self.out_features)  # (..., N) in the kernels' bfloat16
        bias = self._parameters.get("bias")  # not self.bias: QuantizedModule.__getattr__ is slower
        if bias is not None and bias.dtype == x.dtype and x.dtype in (torch.float32, KERNEL_DTYPE):
            return torch.add(y, bias)  # type promotion: bfloat16 + float32 sums in (and returns) float32
        y = y.to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)

    def extra_repr(self):
        group = f", group_size={self.group_size}, scheme={self.scheme}" if self.bits == 4 else ""
        held = f", codes held in the {self.kernel_layout} kernel layout only" if self.kernel_layout else ""
        held += ", scales held in the kernel's bfloat16 pairs only" if "scales" in self.kernel_holds else ""
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, bits={self.bits}{group}{held}"


class QuantEmbedding(QuantizedModule):
    """nn.Embedding with an int8 weight [V, D] and one float16 scale per row. A lookup reads one row per token, so
    this saves file size and memory only, not time. Its output has the model's float dtype (set by .to() and by
    finish_loading)."""

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
        module._buffers["qweight"], module._buffers["scales"] = in_row_slices(quantize_int8, embedding.weight.detach())
        return module

    def dequantize(self, start=0, end=None):
        return dequantize_int8(self.qweight[start:end], self.scales[start:end])  # [V, D] float32, or rows of it

    @property
    def weight(self):
        """The dequantized table. Costly (V x D floats): only for code that reads .weight for its dtype or device."""
        return self.dequantize().to(self.output_dtype)

    def forward(self, input_ids):  # (B, T) -> (B, T, D)
        rows = F.embedding(input_ids, self.qweight).to(self.output_dtype)  # int8 rows of the tokens
        return rows * self.scales[input_ids].to(self.output_dtype)[..., None]


# ----------------------------------------------------------------------------------------------------------------
# 4. Whole models: which module gets what (one function, used both to quantize and to load), swap in, load.


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
    the same plan from config.json. Works on any nn.Module: names below `vision.` or `connector.` count as the
    vision side, a module named `lm_head` / `embed_tokens` (at any depth) gets its own policy, and every other
    nn.Linear is the language model."""
    check_config(config)
    plan = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_vision = name.split(".", 1)[0] in ("vision", "connector")
        if isinstance(module, nn.Embedding) and leaf == "embed_tokens" and not is_vision:
            if config["embedding_bits"] == 8:
                plan[name] = 8
        elif isinstance(module, nn.Linear):
            if leaf == "lm_head":
                bits = config["lm_head_bits"]
            else:
                bits = config["bits"] if (config["include_vision"] or not is_vision) else 16
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


def default_cache_dtype(model: nn.Module) -> torch.dtype | None:
    """The KV cache dtype to use when none is asked for (infer.py --kv-cache auto, bench.py --cache-dtype auto).
    A quantized model is run for its small memory, so its cache is 16-bit too: float16 (11 significant bits), as
    attention runs about as fast in it as in float32 on CPUs without native bfloat16. Anything else: None, the
    model's own dtype (as transformers does)."""
    quantized = any(isinstance(module, QuantizedModule) for module in model.modules())
    float32 = model.llm.final_layernorm.weight.dtype == torch.float32  # a float parameter in every variant
    return torch.float16 if quantized and float32 else None


def quantize_model(model: nn.Module, bits=4, group_size=DEFAULT_GROUP_SIZE, include_vision=False,
                   lm_head_bits=8, embedding_bits=8, scheme="symmetric") -> dict:
    """Quantize a float model in place; returns the quantization config to store beside the weights."""
    config = quantization_config(bits, group_size, include_vision, lm_head_bits, embedding_bits, scheme)
    finish_loading(replace_modules(model, config,
                                   lambda name, module, bits: quantize_module(module, bits, group_size, scheme)))
    return config


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
    """After every buffer is filled: check each one (shape, dtype, loaded at all), give QuantEmbeddings the
    model's float dtype, and build the fast-path layouts once, at load time."""
    float_dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            module.check_buffers(prefix=f"{name}." if name else "")
            if float_dtypes:
                module.output_dtype = float_dtypes[0]
            if isinstance(module, QuantLinear) and module.fast_path_supported():
                module.prepare_fast_path()
    give_back_freed_memory()  # the qweight buffers the int4 kernel layouts replaced, and the converter's temporaries
    return model


# ----------------------------------------------------------------------------------------------------------------
# 5. The command line: convert a checkpoint folder (streaming), or measure how far quantization moves the model.


def layer_type(name):
    """'llm.layers.3.mlp.fc1' -> 'fc1', 'vision.layers.0.self_attn.q_proj' -> 'vision q_proj'."""
    kind = name.rsplit(".", 1)[-1]
    return f"{name.split('.', 1)[0]} {kind}" if name.startswith(("vision.", "connector.")) else kind


def relative_error(weight, quantized) -> float:
    """||W - W'|| / ||W||, W' the weight a quantized module stands for, summed a slice of rows at a time."""
    error = norm = 0.0
    for start, end in row_slices(*weight.shape):
        w = weight[start:end].float()
        error += (quantized.dequantize(start, end) - w).square().sum().item()
        norm += w.square().sum().item()
    return math.sqrt(error) / max(math.sqrt(norm), 1e-30)


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


def convert(model_dir, out_dir, bits=4, group_size=DEFAULT_GROUP_SIZE, include_vision=False, log=print,
            scheme="symmetric") -> dict:
    """Read an Imp folder (either official layout) one tensor at a time, quantize the planned weights, and write
    a folder that imp.Imp.from_pretrained loads directly (current official layout + "quantization" in config)."""
    import re
    import imp
    from safetensors import safe_open
    checkpoint = imp.open_checkpoint(model_dir)
    if checkpoint.layout not in ("imp", "imp-legacy"):
        raise ValueError(f"{model_dir}: holds a {checkpoint.layout} checkpoint, not an Imp one")
    if checkpoint.config.get("quantization"):
        raise ValueError(f"{model_dir}: is already quantized; convert the float checkpoint instead")
    check_output_folder(model_dir, out_dir)
    config = imp.parse_config(checkpoint, imp.ImpConfig)  # a malformed config.json: one clear error
    settings = quantization_config(bits, group_size, include_vision, scheme=scheme)
    model = imp.build_on_meta(imp.Imp, config)  # shapes and module types only, for the plan
    plan = quantization_plan(model, settings)
    table, unused = imp.key_table_imp(config, checkpoint.layout)
    unused = re.compile("|".join(unused)) if unused else None
    rename = imp.official_names(config)
    tensors, float_dtypes, started = {}, set(), time.time()
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
                piece = tensor[rows].clone() if rows else tensor  # the legacy fused Wqkv feeds three layers
                module_name, attribute = ours.rsplit(".", 1)
                if module_name in plan and attribute == "weight":
                    # Wrap the one weight in a float module of its kind (no memory: built on meta, then
                    # given `piece`), and quantize that exactly as quantize_model would.
                    kind = type(model.get_submodule(module_name))
                    with torch.device("meta"):
                        module = nn.Embedding(*piece.shape) if kind is nn.Embedding else nn.Linear(
                            piece.shape[1], piece.shape[0], bias=False)
                    module.weight = nn.Parameter(piece, requires_grad=False)
                    quantized = quantize_module(module, plan[module_name], group_size, scheme)
                    stem = rename(ours).rsplit(".", 1)[0]
                    tensors.update({f"{stem}.{name}": quantized._buffers[name] for name in quantized.expected_buffers()})
                    log(f"[{len(tensors):4d} tensors, {time.time() - started:5.0f}s] {stem} {list(piece.shape)} "
                        f"-> int{plan[module_name]}, relative error {relative_error(piece, quantized):.4f}")
                else:
                    tensors[rename(ours)] = piece.contiguous()  # norms, biases, embeddings kept in float
                    float_dtypes.add(str(piece.dtype).replace("torch.", ""))
            del tensor
            give_back_freed_memory()
    os.makedirs(out_dir, exist_ok=True)
    imp.write_safetensors(out_dir, tensors, metadata={"quantization": json.dumps(settings)})
    tokenizer = imp.load_tokenizer(model_dir)
    imp.save_tokenizer(tokenizer, out_dir, config)
    torch_dtype = float_dtypes.pop() if len(float_dtypes) == 1 else "float16"
    imp.write_json(os.path.join(out_dir, "config.json"),
                   dict(config.to_dict(), torch_dtype=torch_dtype, quantization=settings))  # last: marks it complete
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    log(f"wrote {out_dir}: {size / 1e9:.3f} GB of weights ({len(tensors)} tensors) in {time.time() - started:.0f}s")
    return settings


def eval_samples():
    """A fixed prompt set: text questions, and questions about two drawn images (no files needed)."""
    from PIL import Image, ImageDraw
    images = []
    for shapes in ([("ellipse", (40, 40, 180, 180), (220, 40, 40))],
                   [("rectangle", (30, 200, 150, 320), (40, 80, 220)), ("ellipse", (220, 60, 350, 190), (40, 170, 60))]):
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
    import imp
    with open(path, encoding="utf-8") as f:
        records = json.load(f)[:limit]
    folder = image_folder or os.path.dirname(path)
    return [(imp.load_image(os.path.join(folder, r["image"])) if r.get("image") else None,
             r["conversations"][0]["value"].replace(imp.IMAGE_PLACEHOLDER, "").strip()) for r in records]


@torch.inference_mode()
def evaluate(model_dir, bits=4, group_size=DEFAULT_GROUP_SIZE, include_vision=False, new_tokens=24, samples=None,
             log=print, scheme="symmetric", int8_activations=False) -> dict:
    """float32 model vs the same model quantized. Reports the relative weight error per layer type and, over the
    answer positions of the prompt set: how often the quantized model's greedy (top-1) token equals the float
    model's, with the float answer fed in (teacher forcing: one early difference does not shift everything
    after it), the mean KL(float || quantized) of the next-token distributions there, and the same agreement when
    both generate freely (position by position; this runs the decode path, i.e. the packed kernels).
    int8_activations: the quantized model runs its large inputs with int8 activations (set_int8_activations)."""
    import imp
    model = imp.Imp.from_pretrained(model_dir, dtype=torch.float32)
    if model.config.to_dict().get("quantization") or any(isinstance(m, QuantizedModule) for m in model.modules()):
        raise ValueError(f"{model_dir}: is already quantized; evaluate the float checkpoint")
    samples = samples or eval_samples()
    references = []
    for image, question in samples:
        input_ids, pixel_values = model.prepare_inputs(image, question)
        answer = list(model.generate(input_ids, pixel_values, max_new_tokens=new_tokens))
        full = torch.cat((input_ids, torch.tensor([answer], dtype=input_ids.dtype)), dim=1)
        # The positions whose next token is an answer token: the prompt's last one, and all but the last answer one.
        log_probs = torch.log_softmax(model(full, pixel_values)[0, -len(answer) - 1:-1], dim=-1)  # (len(answer), V)
        references.append((input_ids, pixel_values, full, answer, log_probs))
        if len(samples) <= 10:
            log(f"float32: {question!r} -> {model.tokenizer.decode(answer)!r}")

    errors = {}  # layer type -> relative errors of its weights

    def quantize_and_measure(name, module, bits_here):
        quantized = quantize_module(module, bits_here, group_size, scheme)
        errors.setdefault(layer_type(name), []).append(relative_error(module.weight, quantized))
        return quantized
    settings = quantization_config(bits, group_size, include_vision, scheme=scheme)
    finish_loading(replace_modules(model, settings, quantize_and_measure))
    if int8_activations and not set_int8_activations(model, True):
        log("note: torch._int_mm does not work here: int8 activations not used")

    kl, agree, count, identical, free_agree, free_count = 0.0, 0, 0, 0, 0, 0
    for input_ids, pixel_values, full, answer, reference in references:
        log_probs = torch.log_softmax(model(full, pixel_values)[0, -len(answer) - 1:-1], dim=-1)
        kl += (reference.exp() * (reference - log_probs)).sum().item()
        agree += (reference.argmax(-1) == log_probs.argmax(-1)).sum().item()
        count += len(answer)
        generated = list(model.generate(input_ids, pixel_values, max_new_tokens=new_tokens))  # the decode path
        identical += generated == answer
        free_agree += sum(a == b for a, b in zip(answer, generated))  # position by position, no realignment
        free_count += max(len(answer), len(generated))
        if len(samples) <= 10:
            log(f"int{bits}:    -> {model.tokenizer.decode(generated)!r}")
    report = dict(settings=settings, int8_activations=int8_activations, kl=kl / max(1, count),
                  top1_agreement=agree / max(1, count), positions=count,
                  free_run_agreement=free_agree / max(1, free_count), identical_answers=identical,
                  weight_error={kind: sum(v) / len(v) for kind, v in sorted(errors.items())})
    log("relative weight error ||W - deq(W)|| / ||W||, mean per layer type:")
    for kind, value in report["weight_error"].items():
        log(f"  {kind:24s} {value:.4f}")
    name = f"int{bits}" + (f" {scheme} G={group_size}" if bits == 4 else "") + (" --vision" if include_vision else "") \
        + (" --int8-activations" if int8_activations else "")
    log(f"{name}: greedy tokens equal to float32's at {100 * report['top1_agreement']:.2f}% of {count} answer "
        f"positions teacher-forced, {100 * report['free_run_agreement']:.2f}% free-running; identical answers "
        f"{identical}/{len(references)}; KL {report['kl']:.2e} nats")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Weight-only int8/int4 quantization of an Imp checkpoint folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  python quant.py --model imp-v1-3b --bits 4 --vision --out imp-int4       # 1.91 GB: the small one
  python quant.py --model imp-v1-3b --bits 4 --out imp-int4-textonly       # vision kept in float16: 2.50 GB
  python quant.py --model imp-v1-3b --bits 4 --scheme asymmetric --group-size 64 --vision --out imp-int4-asym
  python quant.py --model imp-v1-3b --bits 8 --out imp-int8
  python quant.py --eval --model imp-v1-3b --bits 8                        # agreement and KL vs float32
  python quant.py --eval --model checkpoints/demo --bits 4 --data data/shapes/test.json --limit 200
  python quant.py --eval --model checkpoints/demo --bits 4 --vision --int8-activations --data data/shapes/test.json
The output folder loads like any other: imp.Imp.from_pretrained("imp-int4"), python infer.py --model imp-int4""")
    parser.add_argument("--model", required=True, help="an Imp folder (official layout, either naming)")
    parser.add_argument("--out", help="output folder (convert mode)")
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
                             "activations (set_int8_activations)")
    parser.add_argument("--data", help="with --eval: a LLaVA-format JSON whose questions to use (default: 5 built in)")
    parser.add_argument("--image-folder", help="with --data: image paths are relative to this (default: its folder)")
    parser.add_argument("--limit", type=int, help="with --data: only the first N records")
    args = parser.parse_args(argv)
    if not args.eval and not args.out:
        parser.error("--out is required to convert (or pass --eval)")
    if args.int8_activations and not args.eval:
        parser.error("--int8-activations only goes with --eval (it is a runtime setting, not stored in the file)")
    import imp
    try:
        if args.eval:
            samples = load_samples(args.data, args.image_folder, args.limit) if args.data else None
            evaluate(args.model, args.bits, args.group_size, args.vision, samples=samples, scheme=args.scheme,
                     int8_activations=args.int8_activations)
        else:
            convert(args.model, args.out, args.bits, args.group_size, args.vision, scheme=args.scheme)
    except (ValueError, OSError, KeyError, imp.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
