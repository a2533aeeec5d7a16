"""
kernels.py: the fast layer. Every CPU speed path of nanoImp, beside the readable model (imp.py, quant.py), which
it never changes the meaning of. A program switches it on with one call:

    model = quant.load("imp-int4")      # or imp.Imp.from_pretrained(...)
    kernels.enable(model)               # int8_activations=True: also int8 activations (W8A8 / W4A8)

Without that call everything works, the readable way, slower. What enable() does, each chosen by a capability
check made once, and each pinned to the readable path by a test (tests/test_kernels.py, tests/test_quant.py):
  0. On x86 CPUs with AVX2, where a C compiler exists, it compiles kernels.c once (a cache folder) and checks it:
     kernels torch lacks there. Without a compiler, everything below still works, with torch's.
  1. Phi-2's MLP computes its GELU in place when autograd is off (one (T, 10240) tensor fewer at prefill), and
     decode attention over a 16-bit KV cache (every decoder) multiplies in float32: kernels.c reading the cache as
     it is, else written out in torch (both faster than the fused kernel).
  2. A bfloat16 decode step multiplies each weight by its single row with kernels.c's bfloat16_matvec, else, on
     CPUs without native bfloat16, torch.addmv (matrix x vector): both read the weight faster than F.linear's
     general product.
  3. QuantLinear layers become PackedQuantLinear. Decode (up to FAST_PATH_MAX_ROWS rows): kernels.c's integer
     products (16-bit activations; int8 ones with int8_activations), reading the stored tensors; without it,
     torch's packed int8 / int4 kernels, the weight held once in the kernel's own layout; either way an int4
     attention layer's q, k, v as one product. Large inputs (prompts, the vision tower): on CPUs without AVX-512,
     kernels.c's float32 prompt product, each weight decoded once into cache; elsewhere dequantized a slice of rows
     at a time into reused scratch memory (by kernels.c in one pass, in the activations' dtype, where it
     compiled); with int8_activations, int8 x int8 products (W8A8) where the CPU has int8 dot-product
     instructions.
Measurements behind these choices are in docs/benchmarks.md and docs/quantization.md.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

import imp
import quant
from quant import padded_in_features, pack_int4, unpack_int4

KERNEL_DTYPE = torch.bfloat16  # the activation dtype the packed kernels are fast with
# Up to this many rows (tokens) the packed kernels beat dequantize + F.linear: their cost grows with the rows, that
# of dequantizing does not, and the two cross at a few hundred rows (docs/quantization.md has the measurements).
# Decode has 1 row, an image prompt ~770: 64 keeps a margin on both sides.
FAST_PATH_MAX_ROWS = 64
ACTIVATION_CHUNK = 2**18  # int8 activations: quantized this many at a time, a 1 MB float32 temporary (L2 cache)


def enable(model: nn.Module, int8_activations: bool | str = False) -> str:
    """Switch every fast path that works on this machine on, in place; returns one line saying which.
    int8_activations: True: for large inputs where the CPU has int8 dot-product instructions, and for decode where
    kernels.c's products pay; "always": for large inputs wherever torch._int_mm works (to measure it, as
    quant.py --eval does)."""
    said = []
    for module in model.modules():
        if type(module) is imp.PhiMLP:
            module.__class__ = InPlaceGeluMLP  # the same tensors, another forward
        elif type(module) is imp.SiglipMLP:
            module.__class__ = InPlaceGeluSiglipMLP
        elif type(module) is imp.PhiAttention:
            module.__class__ = DecodeAttention
        elif type(module) is imp.LlamaAttention:
            module.__class__ = LlamaDecodeAttention
    compiled = compiled_kernels() is not None
    if compiled:
        said.append("decode attention by kernels.c")
    if compiled or bfloat16_is_emulated():
        for name, module in model.named_modules():
            if type(module) is nn.Linear and not name.startswith(("vision", "connector")):
                module.__class__ = RowVectorLinear
        said.append("bfloat16 rows by " + ("kernels.c" if compiled else "addmv"))
    packed = [m for m in model.modules() if isinstance(m, quant.QuantLinear)]
    for layer in packed:
        if not isinstance(layer, PackedQuantLinear):
            layer.__class__ = PackedQuantLinear
    large_inputs = int8_products_are_native() or int8_activations == "always"
    if int8_activations:  # (it chooses the decode kernels too)
        count = set_int8_activations(model, True, large_inputs)
    else:
        count = 0
        choose_compiled_kernels(packed, int8_activations=False)
    for layer in packed:
        if layer.fast_path_supported():
            layer.prepare_fast_path()
    fused = sum(fuse_projections(module) for module in model.modules()
                if isinstance(module, (DecodeAttention, LlamaDecodeAttention)))
    quant.give_back_freed_memory()  # the qweight buffers the int4 kernel layouts replaced
    if any(not layer.decodes_in_c for layer in packed):  # torch's packed kernels decode them, where they work
        kinds = [bits for bits, ok in packed_kernels_available().items() if ok]
        said.append(f"packed int{'/int'.join(map(str, kinds))} kernels" if kinds else "no packed kernels here")
    if packed:
        if fused:
            said.append(f"q, k, v in one product in {fused} layers")
        sixteen = sum(1 for layer in packed if layer.int16_decode)
        if sixteen:
            said.append(f"{sixteen} layers decoding through kernels.c (16-bit activations)")
        prompts = sum(1 for layer in packed if layer.prompt_in_c)
        if prompts:
            said.append(f"prompts through kernels.c in {prompts} layers")
    if int8_activations:
        said.append(int8_activations_said(packed, count, large_inputs))
    return ", ".join(said) or "nothing to speed up"


def int8_activations_said(layers, count, large_inputs) -> str:
    """enable()'s words on int8 activations: where they apply here, and why not where they do not."""
    decode = sum(1 for layer in layers if layer.int8_decode)
    large = large_inputs and int8_matmul_available()
    why_not_large = "torch._int_mm does not work here" if large_inputs else \
        "this CPU has no int8 dot-product instructions (VNNI, AMX), where they are slower than float32"
    if not count:
        return "int8 activations unavailable here" if large_inputs else \
            f"int8 activations off: {why_not_large}, and no compiled decode kernels (kernels.c)"
    through = f"{decode} layers decoding through kernels.c"
    if not large:
        return f"int8 activations in {through}; prefill and vision in float: {why_not_large}"
    return f"int8 activations in {count} layers" + (f", {through}" if decode else "")


# ----------------------------------------------------------------------------------------------------------------
# 0. kernels.c, the compiled part: kernels for x86 CPUs with AVX2 where torch's are slow (its header says why),
#    compiled once per machine into a cache folder where a C compiler exists, checked, loaded with ctypes.


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags (x86 "flags", ARM "Features" in /proc/cpuinfo); empty where that file does not exist
    (macOS, Windows): then every capability below reads "no", and the paths that are always right are taken."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


COMPILED_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.c")
# -ffp-contract=off: a * b + c in the C stays two roundings, as written and as torch computes it, never one FMA
COMPILER_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


def compiled_kernel_folder() -> str:
    """Where the compiled library is kept: $NANOIMP_CACHE, else ~/.cache/nanoimp."""
    return os.environ.get("NANOIMP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanoimp")


def compile_kernels() -> str:
    """Compile kernels.c into the cache folder, once (the file name holds a hash of the source, the compiler
    and its flags), and return the library's path. Written under a temporary name, then renamed: a half-written
    library is never loaded, and two processes compiling at once both end with a whole one."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc, gcc, clang or $CC)")
    with open(COMPILED_SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha256(source + repr((compiler, COMPILER_FLAGS)).encode()).hexdigest()[:16]
    folder = compiled_kernel_folder()
    library = os.path.join(folder, f"kernels-{digest}.so")
    if not os.path.exists(library):
        os.makedirs(folder, exist_ok=True)
        temporary = f"{library}.{os.getpid()}.tmp"
        try:
            subprocess.run([compiler, *COMPILER_FLAGS, COMPILED_SOURCE, "-o", temporary, "-lm"], check=True,
                           capture_output=True, timeout=120)
            os.replace(temporary, library)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    return library


@functools.cache
def compiled_kernels():
    """kernels.c as a ctypes library where it works here, else None: an x86 CPU with AVX2, FMA and F16C, a C
    compiler, and the right numbers on small random inputs. NANOIMP_COMPILE=0 in the environment turns it off."""
    if os.environ.get("NANOIMP_COMPILE") == "0" or not {"avx2", "fma", "f16c"} <= cpu_flags():
        return None
    try:
        library = ctypes.CDLL(compile_kernels())
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        # int4_matmul(qweight, scales, zeros, blocks, group_shift, x, K, rows, y, N, bits, bias)
        library.int4_matmul.argtypes = [pointer] * 3 + [integer] * 2 + [pointer] + [integer] * 2 + [pointer] + \
            [integer] * 2 + [pointer]
        library.attend_one_row.argtypes = [pointer] * 4 + [integer] * 5 + [ctypes.c_int64] * 2 + \
            [integer, ctypes.c_float]
        library.int8_matmul.argtypes = [pointer, pointer, integer, pointer, integer, pointer, integer, integer, pointer]
        # prompt_matmul(qweight, scales, zeros, bits, blocks, group_shift, x, K, rows, y, N, bias)
        library.prompt_matmul.argtypes = [pointer] * 3 + [integer] * 3 + [pointer] + [integer] * 2 + [pointer] + \
            [integer, pointer]
        for kernel in (library.int4_matmul, library.int8_matmul, library.prompt_matmul, library.attend_one_row):
            kernel.restype = integer
        library.gelu_tanh.argtypes, library.gelu_tanh.restype = [pointer, ctypes.c_int64], None
        # dequantize_int4(qweight, scales, zeros, blocks, group_shift, row0, rows, K, out, bfloat16)
        library.dequantize_int4.argtypes = [pointer] * 3 + [integer] * 5 + [pointer, integer]
        library.dequantize_int4.restype = None
        # bfloat16_matvec(weight, x, K, y, N, bias)
        library.bfloat16_matvec.argtypes = [pointer, pointer, integer, pointer, integer, pointer]
        library.bfloat16_matvec.restype = integer
        return library if compiled_kernels_agree(library) else None
    except (OSError, subprocess.SubprocessError, AttributeError):  # no compiler, a failed compile, a bad library
        return None


def compiled_kernels_agree(library) -> bool:
    """Whether the kernels match the readable path on small random inputs: int4_matmul and int8_matmul
    quant.QuantLinear's product within the activations' rounding (int8 ones ~0.5%, 16-bit ones within 1e-4; both int4
    schemes, groups of 32 and of 64 with padding, an odd number of blocks; one row, a decode step, and five: a tile
    of 4 and one more), prompt_matmul it within float32 rounding (the same weights, seven rows: a tile of 6 and one
    more), dequantize_int4 its dequantize() exactly (float32 and bfloat16), attend_one_row attend_one_row_in_torch
    within float32 rounding (both 16-bit dtypes, grouped heads, a cache preallocated longer than the keys),
    bfloat16_matvec F.linear within bfloat16 rounding (a width that is no multiple of 16), and gelu_tanh F.gelu's
    tanh form within float32 rounding."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 288, generator=generator)  # 288 columns: 9 blocks, 9 groups of 32 (8 at a time, and 1)
    for scheme, group_size in (("symmetric", 32), ("asymmetric", 64)):
        layer = quant.QuantLinear.from_linear(nn.Linear(288, 48, bias=False), 4, group_size, scheme=scheme)
        with torch.no_grad():
            layer.load_quantized(torch.randn(48, 288, generator=generator))
        for rows, bits, tolerance in ((5, 8, 2e-2), (1, 8, 2e-2), (5, 16, 1e-4), (1, 16, 1e-4)):
            want = layer(x[:rows])
            got = int4_matmul_compiled(x[:rows], layer.qweight, layer.scales, layer._buffers.get("zeros"),
                                       group_size, library, bits)
            if not (got - want).norm() < tolerance * want.norm():
                return False
        if not prompt_agrees(library, layer, x):
            return False
        for dtype in (torch.float32, torch.bfloat16):  # rows 3 .. 40, bit for bit, cut at 270 columns (padding)
            got = dequantize_int4_compiled(layer.qweight, layer.scales, layer._buffers.get("zeros"), group_size,
                                           270, 3, 41, dtype, library=library)
            if not torch.equal(got, layer.dequantize(3, 41)[:, :270].to(dtype)):
                return False
    layer = quant.QuantLinear.from_linear(nn.Linear(288, 48, bias=False), 8)
    with torch.no_grad():
        layer.load_quantized(torch.randn(48, 288, generator=generator))
    for rows, bits, tolerance in ((5, 8, 2e-2), (1, 8, 2e-2), (5, 16, 1e-4), (1, 16, 1e-4)):
        got, want = int8_matmul_compiled(x[:rows], layer.qweight, layer.scales, library, bits), layer(x[:rows])
        if not (got - want).norm() < tolerance * want.norm():
            return False
    if not prompt_agrees(library, layer, x):
        return False
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.randn(1, 4, 1, 16, generator=generator)
        k, v = (torch.randn(1, 2, 40, 16, generator=generator).to(dtype)[:, :, :37] for _ in range(2))
        if not torch.allclose(attend_one_row_compiled(q, k, v, library), attend_one_row_in_torch(q, k, v),
                              rtol=1e-4, atol=1e-5):
            return False
    weight, bias = torch.randn(40, 118, generator=generator).bfloat16(), torch.randn(40, generator=generator)
    x = torch.randn(118, generator=generator).bfloat16()  # 118 columns: 3 steps of 32, one of 16, and 6 more
    if not torch.allclose(bfloat16_matvec_compiled(x, weight, bias, library).float(),
                          F.linear(x.float(), weight.float(), bias).bfloat16().float(), rtol=1e-2, atol=1e-2):
        return False
    x = torch.cat([torch.linspace(-20, 20, 2001), torch.randn(2100, generator=generator) * 3])  # a partial chunk
    return torch.allclose(gelu_tanh_compiled(x.clone(), library), F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)


def prompt_agrees(library, layer, x) -> bool:
    """Whether kernels.c's prompt product of the quant.QuantLinear `layer` is its readable product of x, within
    float32 rounding."""
    got = prompt_matmul_compiled(x, layer.qweight, layer.scales, layer._buffers.get("zeros"), layer.group_size,
                                 library=library)
    return torch.allclose(got, layer(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 1-2. Float models: in-place GELU, decode attention over a 16-bit cache, bfloat16 single rows.


@functools.cache
def best_cpu_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies bfloat16 natively (x86 AVX-512 BF16 or AMX, ARMv8.6 BF16), else float32:
    without native support every bfloat16 product is converted in software and runs slower than float32."""
    return torch.bfloat16 if cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"} else torch.float32


def bfloat16_is_emulated() -> bool:
    """True where bfloat16 products are converted in software (no AVX-512 BF16 / AMX / ARM BF16)."""
    return best_cpu_dtype() != torch.bfloat16


class GeluInPlace:
    """fc2(gelu(fc1(x))), GELU's tanh form, overwriting fc1's output when autograd is off (generation): no second
    (B, T, 10240) tensor beside it (32 MB in float32 at a 770-token prefill), and kernels.c's GELU where it applies.
    Training keeps the readable forward."""

    def forward(self, x):
        if torch.is_grad_enabled():
            return super().forward(x)
        return self.fc2(gelu_tanh_(self.fc1(x)))


class InPlaceGeluMLP(GeluInPlace, imp.PhiMLP):
    pass


class InPlaceGeluSiglipMLP(GeluInPlace, imp.SiglipMLP):
    pass


def gelu_tanh_(x):
    """x <- F.gelu(x, approximate="tanh"), in place: kernels.c where it applies (float32, contiguous, on the CPU;
    the same function within float32 rounding, vectorized, where torch's tanh is several times slower on AVX2),
    else torch's gelu_."""
    library = compiled_kernels()
    if library is not None and x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu":
        return gelu_tanh_compiled(x, library)
    return torch.ops.aten.gelu_(x, approximate="tanh")


def gelu_tanh_compiled(x, library):
    """x (float32, contiguous, CPU) <- its GELU (tanh form), by kernels.c; returns x."""
    library.gelu_tanh(x.data_ptr(), x.numel())
    return x


def is_decode_over_16_bit_cache(q, k) -> bool:
    """One query row (a decode step) over a 16-bit KV cache on the CPU: where attend_one_row is the faster path."""
    return q.shape[-2] == 1 and k.dtype in (torch.float16, torch.bfloat16) and k.device.type == "cpu"


def in_float32_over_16_bit_cache(q, k, v):
    """(q, k, v) for a prompt chunk of a float32 model over a 16-bit KV cache: the keys and values so far
    converted to float32 (a transient copy, ~16 MB a layer at Imp's 770 positions), where torch's fused kernel is
    faster than over float16 or bfloat16 on CPUs without native 16-bit arithmetic, and multiplies float32 queries
    unrounded (docs/benchmarks.md). Anything else as it is."""
    if q.dtype == torch.float32 and k.dtype in (torch.float16, torch.bfloat16) and k.device.type == "cpu":
        return q, k.float(), v.float()
    return q, k, v


def attend_one_row(q, k, v):
    """softmax(q k^T / sqrt(D)) v for one query row per head over a 16-bit cache: kernels.c where it applies (it
    reads the cache as it is: half the memory traffic of a float32 copy, and no copy), else in torch."""
    library = compiled_kernels()
    if library is not None and compiled_attention_applies(q, k, v):
        return attend_one_row_compiled(q, k, v, library)
    return attend_one_row_in_torch(q, k, v)


def attend_one_row_in_torch(q, k, v):
    """softmax(q k^T / sqrt(D)) v for one query row per head, multiplied in float32, written out: q (B, H, 1, D);
    k, v (B, kv heads, T, D), 16-bit, kv heads dividing H (grouped-query attention: query heads g*j .. g*j + g-1
    share key/value head j, as repeat_interleave in imp.LlamaAttention.attend lays them out) -> (B, H, 1, D).
    torch's fused attention kernel runs its 16-bit CPU path several times slower than these products on the cache
    converted to float32 (docs/benchmarks.md); the conversion is cheaper than the difference. The probabilities
    and the sums are float32 in both, so only the order of the additions differs. No mask: the one new token sees
    every cached one (a sliding window is cut off by the caller)."""
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    queries = q.float().view(B, kv_heads, H // kv_heads, D)  # the query heads sharing a key/value head, as rows
    scores = (queries @ k.float().transpose(-2, -1)) * (D ** -0.5)  # (B, kv heads, H / kv heads, T)
    return (torch.softmax(scores, dim=-1) @ v.float()).view(B, H, 1, D)


def compiled_attention_applies(q, k, v) -> bool:
    """kernels.c's attend_one_row takes keys and values laid out alike, each row D contiguous numbers (a slice of
    a preallocated cache is), D a multiple of 8 up to 256."""
    D = q.shape[-1]
    return (k.stride() == v.stride() and k.stride(-1) == 1 and k.stride(-2) == D and D % 8 == 0 and D <= 256
            and q.shape[0] == k.shape[0] and q.device.type == "cpu")


def attend_one_row_compiled(q, k, v, library):
    """attend_one_row_in_torch by kernels.c: q (B, H, 1, D), k, v (B, kv heads, T, D) 16-bit -> (B, H, 1, D)
    float32."""
    B, H, _, D = q.shape
    query = q.float().contiguous()
    out = torch.empty(B, H, 1, D)
    if library.attend_one_row(query.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, k.shape[1],
                              k.shape[2], D, k.stride(0), k.stride(1), k.dtype == torch.bfloat16, D ** -0.5):
        raise MemoryError("kernels.c: no memory for the attention scores")
    return out


class DecodeAttention(imp.PhiAttention):
    """imp.PhiAttention whose decode step over a 16-bit KV cache goes through attend_one_row and whose prompt
    chunks over it attend in float32, and whose q, k, v come from one FusedProjection where fuse_projections made
    one."""

    def project(self, x, rotary):
        return project_fused(self, x, rotary, self.config.rotary_dim) or super().project(x, rotary)

    def attend(self, q, k, v):
        if is_decode_over_16_bit_cache(q, k):
            return attend_one_row(q, k, v)
        return super().attend(*in_float32_over_16_bit_cache(q, k, v))


class LlamaDecodeAttention(imp.LlamaAttention):
    """imp.LlamaAttention (Imp-2B, Imp-4B) whose decode step over a 16-bit KV cache goes through attend_one_row,
    the keys beyond Phi-3's sliding window cut off first (the new token sees the `window` latest, itself included),
    and grouped-query heads shared without repeating the cache; prompt chunks and q, k, v as in DecodeAttention."""

    def project(self, x, rotary):
        return project_fused(self, x, rotary, self.head_dim) or super().project(x, rotary)

    def attend(self, q, k, v):
        if not is_decode_over_16_bit_cache(q, k):
            return super().attend(*in_float32_over_16_bit_cache(q, k, v))
        window = self.config.sliding_window
        if window is not None and k.shape[-2] > window:
            k, v = k[:, :, -window:], v[:, :, -window:]
        return attend_one_row(q, k, v)


class FusedProjection:
    """q_proj, k_proj and v_proj of one attention layer as one int4 product (rows q, then k, then v): a decode step
    calls the kernel once per layer instead of three times (the activations rounded once, for kernels.c), and the
    larger product runs faster per weight. The three layers keep working on their own, on views into this one's
    tensors, so no weight is held twice:
      torch's int4 kernel: their kernel layouts (the codes' rows are contiguous; the (scale, zero) pairs a strided
        slice);
      kernels.c: their stored buffers, row slices of one tensor per buffer.
    Not a module: nothing is saved from it, and it gives way (valid() is False) as soon as any of the three layers
    rebuilds its kernel layout (a move, a load_state_dict, another decode kernel)."""

    def __init__(self, layers):
        self.layers, self.sizes = layers, [layer.out_features for layer in layers]
        first = layers[0]
        self.in_features, self.group_size, self.in_c = first.in_features, first.group_size, first.compiled
        biases = [layer._parameters.get("bias") for layer in layers]
        self.bias = None if biases[0] is None else torch.cat([b.detach().float() for b in biases])
        if self.in_c:  # [Nq + Nk + Nv, ...] per stored buffer; each layer's buffers become its rows
            self.buffers = {name: torch.cat([layer._buffers[name] for layer in layers])
                            for name in first.expected_buffers()}
        else:
            self.codes = torch.cat([layer.kernel_tensors[0] for layer in layers])  # [Nq + Nk + Nv, Kp/2] uint8
            self.pairs = torch.cat([layer.kernel_tensors[1] for layer in layers], dim=1)  # [Kp/G, N, 2] bfloat16
        start = 0
        for layer, rows in zip(layers, self.sizes):
            if self.in_c:
                layer._buffers.update({name: tensor[start:start + rows] for name, tensor in self.buffers.items()})
                layer.kernel_tensors = tuple(layer._buffers[name] for name in layer.expected_buffers())
            else:
                layer.kernel_tensors = (self.codes[start:start + rows], self.pairs[:, start:start + rows])
            start += rows
        self.views = [layer.kernel_tensors for layer in layers]

    def valid(self) -> bool:
        return all(layer.kernel_tensors is views for layer, views in zip(self.layers, self.views))

    def __call__(self, x):  # x (..., K) float -> (..., Nq + Nk + Nv) float32, a new tensor
        if self.in_c:
            bits = 8 if self.layers[0].int8_decode else 16
            return int4_matmul_compiled(x, self.buffers["qweight"], self.buffers["scales"], self.buffers.get("zeros"),
                                        self.group_size, activation_bits=bits, bias=self.bias)
        x2d = aligned(x.reshape(-1, self.in_features).to(KERNEL_DTYPE))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.codes, self.group_size, self.pairs)
        y = y.float() if self.bias is None else torch.add(y, self.bias)  # bfloat16 + float32 sums in float32
        return y.view(*x.shape[:-1], -1)


def fuse_projections(attention) -> bool:
    """Give `attention` a FusedProjection of its q/k/v when all three are int4 PackedQuantLinear layers with the
    same settings (and bias or not), prepared for the same kernel: kernels.c (it reads the stored buffers, any
    shape), or torch's int4 kernel holding the codes only in its layout (else fusing would copy them) in whole blocks
    of rows (it lays a partial last block out differently), with no padded columns. True if fused."""
    layers = [attention.q_proj, attention.k_proj, attention.v_proj]
    first = layers[0]
    if not all(isinstance(layer, PackedQuantLinear) and layer.bits == 4 and layer.kernel_tensors is not None
               and (layer.in_features, layer.group_size, layer.scheme) == (first.in_features, first.group_size,
                                                                           first.scheme)
               and (layer.bias is None) == (first.bias is None) for layer in layers):
        return False
    in_c = all(layer.compiled and layer.int8_decode == first.int8_decode for layer in layers)
    in_torch = all(not layer.compiled and "qweight" in layer.kernel_holds
                   and layer.kernel_tensors[0].dtype == torch.uint8
                   and layer.out_features % INT4_KERNEL_LAYOUTS[layer.kernel_layout][0] == 0  # whole blocks of rows
                   and padded_in_features(layer.in_features, 4, layer.group_size) == layer.in_features  # no padding
                   for layer in layers)
    if not (in_c or in_torch):
        return False
    attention.__dict__["fused_qkv"] = FusedProjection(layers)  # a plain attribute: not a submodule, never saved
    return True


def project_fused(attention, x, rotary, rotary_dim):
    """imp's project() (q, k, v split into heads, rotary applied) through the layer's FusedProjection, or None
    where that does not apply: none made or no longer valid, more than FAST_PATH_MAX_ROWS rows, or autograd on."""
    fused = attention.__dict__.get("fused_qkv")
    B, T, _ = x.shape
    if fused is None or B * T > FAST_PATH_MAX_ROWS or torch.is_grad_enabled() or not fused.valid():
        return None
    q_size, k_size, v_size = fused.sizes
    q_and_k, v = fused(x).split([q_size + k_size, v_size], dim=-1)
    heads = lambda t: t.view(B, T, -1, attention.head_dim)  # (B, T, heads, D)
    q_and_k = heads(q_and_k)
    rotate_in_place(q_and_k, *rotary, rotary_dim)  # the queries' and the keys' heads at once
    q, k = q_and_k.split([q_size // attention.head_dim, k_size // attention.head_dim], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), heads(v).transpose(1, 2)  # (B, heads, T, D)


def rotate_in_place(x, cos, sin, rotary_dim):
    """imp.apply_rotary on x (B, T, heads, D), overwriting it: seven operations on the rotated dims instead of
    twenty on copies for q and k apart (a decode step runs this once per layer, and at one row an operation costs
    its overhead, not its arithmetic). The same products, each rounded, then the same sums: the same numbers
    (addcmul_ would fuse a product into its sum, rounding once). The two halves of the cos and sin tables are
    equal (one angle per pair of dims, imp.rotary_cos_sin)."""
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]  # (B, T, heads, half): dim i pairs with dim i + half
    cos, sin = cos[:, None, :half], sin[:, None, :half]  # (T, 1, half)
    first = (x1 * cos).sub_(x2 * sin)  # x1 cos - x2 sin
    x2.mul_(cos).add_(x1 * sin)        # x2 cos + x1 sin (x1 not yet overwritten)
    x1.copy_(first)


class RowVectorLinear(nn.Linear):
    """nn.Linear whose single bfloat16 row (a decode step) reads the weight at the memory's speed: kernels.c's
    bfloat16_matvec where it compiled, else, on CPUs without native bfloat16, torch.addmv (matrix x vector). F.linear
    sends one row to the general product, which reads the weight at half that speed or less (docs/benchmarks.md).
    All three sum exact products in float32; anything else is F.linear."""

    def forward(self, x):
        if x.dtype != torch.bfloat16 or x.numel() != self.in_features or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        library = compiled_kernels()
        if library is not None and not (torch.is_grad_enabled() and self.weight.requires_grad):  # (no backward)
            y = bfloat16_matvec_compiled(x, self.weight, self.bias, library)
        elif bfloat16_is_emulated():
            vector = x.reshape(self.in_features)
            y = torch.mv(self.weight, vector) if self.bias is None else torch.addmv(self.bias, self.weight, vector)
        else:
            return F.linear(x, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def bfloat16_matvec_compiled(x, weight, bias, library):
    """x (K elements) times weight [N, K] bfloat16, plus bias, by kernels.c: summed in float32, rounded to
    bfloat16 once at the end, as F.linear does -> [N] bfloat16."""
    out_features, in_features = weight.shape
    vector = x.reshape(in_features).float()
    weight = weight.contiguous()
    y = torch.empty(out_features, dtype=torch.float32)
    bias = float32_vector(bias)
    if library.bfloat16_matvec(weight.data_ptr(), vector.data_ptr(), in_features, y.data_ptr(), out_features,
                               None if bias is None else bias.data_ptr()):
        raise MemoryError("kernels.c: no memory for the activations")
    return y.to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# 3a. Scratch memory and alignment.

_scratch = threading.local()  # per thread: {(purpose, dtype, device, inference mode): a flat tensor}


def scratch(purpose, numel, dtype, device):
    """A flat tensor of `numel` elements that is the same memory at every call with the same purpose, dtype and
    device (from the same thread; grown when too small): for a temporary that is dead before the next call.
    Dequantizing every weight of a prefill into fresh 6-32 MB tensors goes through malloc, whose freed blocks glibc
    keeps and cannot always reuse for the next size: that raised a query's peak memory by 0.06-0.19 GB."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    # (one made in inference mode cannot be written outside it: a separate one for each)
    key = (purpose, dtype, torch.device(device), torch.is_inference_mode_enabled())
    if key not in buffers or buffers[key].numel() < numel:
        buffers.pop(key, None)  # the old one is freed before the larger one is made
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel]


def aligned(tensor):
    """`tensor`, or a contiguous copy of it if its data does not start on a 64-byte boundary. The int8 kernel
    crashes (torch 2.13) on weights or activations that are not 16 / 32-byte aligned, which a view into a
    safetensors file or a slice of a larger tensor can be. Fresh tensors are 64-aligned."""
    if tensor.is_contiguous() and tensor.data_ptr() % 64 == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def dequantize_int8(qweight, scales, out=None):
    """quant.dequantize_int8, written into `out` if given: int8 * float32 promotes to float32 in one pass."""
    return torch.mul(qweight, scales.float()[:, None], out=None if out is None else out.view(qweight.shape))


def dequantize_int4_codes(q, scales, zeros, group_size, in_features, out=None):
    """quant.dequantize_int4 from the unpacked codes q [N, Kp], written into `out` (N * Kp float32) if given,
    as q * scale + (zero - 8 * scale): one fused pass over the big tensor, in place on the codes cast to float32."""
    out_features, padded = q.shape
    groups = q.view(out_features, padded // group_size, group_size)  # [N, Kp/G, G]
    scales = scales.float()[..., None]  # [N, Kp/G, 1]
    offset = -8 * scales if zeros is None else zeros.float()[..., None] - 8 * scales
    weight = groups.to(torch.float32) if out is None else out.view(groups.shape).copy_(groups)
    torch.addcmul(offset, weight, scales, out=weight)
    return weight.view(out_features, padded)[:, :in_features]  # [N, K], padding dropped


def same_bits(a, b):
    """a and b hold the same float16 numbers, bit for bit (-0.0 is not 0.0 here: a file keeps the sign)."""
    return a.shape == b.shape and torch.equal(a.to(quant.SCALE_DTYPE).view(torch.int16), b.view(torch.int16))


# ----------------------------------------------------------------------------------------------------------------
# 3b. The packed CPU kernels: private ATen ops whose signatures have changed between torch releases, so they are
#     tried once on a tiny matrix and compared with the readable path; any failure means "use the readable path".


@functools.cache
def packed_kernels_available() -> dict:
    """{8: bool, 4: bool}: which packed kernels run here and give the right numbers (e.g. none on some builds)."""
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(16, 64, generator=generator), torch.randn(2, 64, generator=generator).to(KERNEL_DTYPE)
    available = {}
    for bits in quant.SUPPORTED_BITS:
        try:  # asymmetric: non-zero zero points, so that the check covers both halves of the (scale, zero) pairs
            layer = PackedQuantLinear.from_linear(nn.Linear(64, 16, bias=False), bits, 32, scheme="asymmetric")
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
#     "halves": byte j of a column holds row j in its low nibble and row j + B/2 in its high one
#     "pairs":  byte j holds rows 2j (low) and 2j + 1 (high); the last block, when N is not a multiple of B
#               (16, 32 or 48 rows), is always stored like this, and so is every block without vector units.
# Since that is an observation, not an interface, int4_kernel_layout() checks it once per process on random
# codes, and prepare_fast_path checks it again on each real layer; if either check fails, the layer keeps our
# qweight beside the kernel's copy: more memory, never a wrong weight.
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
# 3c. int8 activations (W8A8, opt-in): the large products of prefill and the vision tower as int8 x int8 GEMMs.
#
# Prefill (770 rows) and the vision tower (729 rows) are bound by arithmetic, not by memory: on a CPU without
# native bfloat16 they run in float32, whatever the weights are stored in. VNNI instructions multiply 4x as many
# int8 pairs per instruction as float32 FMAs, and torch._int_mm (int8 [M, K] x int8 [K, N] -> int32 [M, N])
# reaches them. For that the activations must be int8 too, quantized at every call, one scale per row (token):
#     row_scale[m] = max|x[m]| / 127,   qx = round(x / row_scale)
# Tokens differ in size by orders of magnitude, and a row's scale factors out of its dot products exactly:
#     y[m, n] ~ row_scale[m] * channel_scale[n] * sum_k qx[m, k] qw[n, k]      (an int32 sum, far below 2^31)
# Each factor is rounded by at most half a step; on Gaussian rows the output moves by about 1% (the tests' bound).
# int8 layers use their stored weight; int4 layers requantize a slice of rows to int8 at each call (int8_weight).


@functools.cache
def int8_matmul_available() -> bool:
    """Whether torch._int_mm runs here and gives the exact int32 products (checked once, on a tiny matrix)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (17, 72), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 72), generator=generator, dtype=torch.int8)
    try:
        got = torch._int_mm(a, b.t())
        return got.dtype == torch.int32 and torch.equal(got, (a.long() @ b.long().t()).int())
    except Exception:  # RuntimeError, NotImplementedError, AttributeError (op missing): all mean "no"
        return False


def int8_products_are_native() -> bool:
    """Whether this CPU multiplies int8 pairs in hardware: x86 VNNI (AVX-512 or AVX) or AMX, ARM's dot-product or
    i8mm instructions. Without them torch._int_mm runs generic code, far slower than the float32 product it would
    replace (docs/benchmarks.md), and enable() leaves int8 activations off."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


def set_int8_activations(model: nn.Module, enabled: bool = True, large_inputs: bool = True) -> int:
    """Switch int8 activations in every quantized Linear of `model` on (or off again); returns how many layers they
    now apply to. Large inputs (more than FAST_PATH_MAX_ROWS rows: prefill, the vision tower) take torch._int_mm
    where it works here and `large_inputs` is set; decode goes through kernels.c where it pays."""
    layers = [module for module in model.modules() if isinstance(module, quant.QuantLinear)]
    for layer in layers:
        if not isinstance(layer, PackedQuantLinear):
            layer.__class__ = PackedQuantLinear
        layer.int8_activations = enabled and large_inputs
    choose_compiled_kernels(layers, int8_activations=enabled)
    for module in model.modules():  # a fused q/k/v whose layers gave their kernel layout up
        fused = module.__dict__.get("fused_qkv")
        if fused is not None and not fused.valid():
            del module.__dict__["fused_qkv"]
    large = int8_matmul_available() and large_inputs
    return sum(1 for layer in layers if enabled and (large or layer.int8_decode))


def choose_compiled_kernels(layers, int8_activations: bool):
    """Which kernels multiply each PackedQuantLinear. Where kernels.c compiled (int8 layers: where K is a multiple
    of 32), its products decode, with 16-bit activations or with int8 ones when int8_activations, and, where
    compiled_prompt_pays(), take prompts (more than FAST_PATH_MAX_ROWS rows) in float32; elsewhere torch's packed
    kernels decode (bfloat16 activations), and prompts are dequantized."""
    pay = compiled_decode_pays()
    for layer in layers:
        compiled = pay and (layer.bits == 4 or layer.in_features % BLOCK == 0)
        int8, int16 = compiled and int8_activations, compiled and not int8_activations
        if (int8, int16) != (layer.int8_decode, layer.int16_decode):
            layer.release_kernel_tensors()  # the other decode kernel reads another layout: built again when used
            layer.int8_decode, layer.int16_decode = int8, int16


def quantize_activations(x2d):
    """x [M, K] float -> (int8 [M, K] codes, float32 [M, 1] row scales), row_scale = max|row| / 127. The codes are
    written into scratch memory (valid until the next call): they live across the slices of one layer, no longer."""
    rows, columns = x2d.shape
    # max|x| as max(max x, -min x): two reductions that need no |x| temporary of the activations' size
    scale = torch.maximum(x2d.amax(dim=1), x2d.amin(dim=1).neg()).float().div_(127)[:, None]  # [M, 1]
    scale.masked_fill_(scale == 0, 1.0)  # an all-zero row: codes 0, any scale gives it back
    codes = scratch("a8 codes", rows * columns, torch.int8, x2d.device).view(rows, columns)
    # x / scale, rounded, a chunk of rows at a time: no float32 quotient of the whole input at the prefill's peak.
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
# 3d. kernels.c's products: decode in integers (x86 with AVX2), prompts in float32 (without AVX-512).
#
# torch's int4 and int8 kernels convert every weight to a float and multiply it by a bfloat16 activation: on AVX2
# CPUs bound by that arithmetic rather than by memory, with AVX-512 still short of the memory's speed at one row
# (docs/benchmarks.md). kernels.c rounds the activations to integers per block of 32 and multiplies the codes by
# them as integers, reading our formats as stored (qweight and the float16 scales: no second layout, so less memory
# than torch's). By default to 16 bits (~1e-5 from the float product, closer than torch's bfloat16 activations),
# with --int8-activations to 8 bits (~0.5%, 32 products to an instruction, the way llama.cpp's Q4_0 / Q8_0 x Q8_0
# products do).
#
# Large inputs (a prompt, the vision tower) are bound by arithmetic anywhere: ~2 * rows operations per weight read.
# Dequantizing writes the whole weight out and reads it back for torch's product; kernels.c's prompt_matmul
# decodes each weight once, into a panel that stays in cache, and multiplies it there in float32 register tiles:
# the readable path's numbers, faster on AVX2 CPUs (docs/benchmarks.md). With AVX-512, torch's product runs twice
# as wide (and in bfloat16 where that is native), and is kept; kernels.c's dequantize_int4 then writes each slice
# of the weight in one pass, in the dtype that product reads.

BLOCK = 32  # activations per rounding step in kernels.c (llama.cpp's Q8_0 block): 16 bytes of int4 codes


def compiled_decode_pays() -> bool:
    """Whether kernels.c decodes quantized layers: wherever it compiled. Its products read the weights near the
    memory's speed; torch's packed kernels convert every weight to a float first, bound by that arithmetic on AVX2
    CPUs and short of the memory's speed with AVX-512 too (docs/benchmarks.md: an AVX2 Zen 3, an AVX-512 Zen 5)."""
    return compiled_kernels() is not None


def compiled_prompt_pays() -> bool:
    """Whether kernels.c's float32 prompt product beats dequantizing for torch's: on x86 CPUs without AVX-512.
    With AVX-512 torch's product runs twice as wide, and with native bfloat16 the model multiplies in it."""
    return compiled_kernels() is not None and "avx512f" not in cpu_flags()


def group_shift(group_size) -> int:
    """kernels.c's size of an int4 group: 2^shift blocks of 32 columns (32, 64, 128 -> 0, 1, 2)."""
    return (group_size // BLOCK).bit_length() - 1


def int4_matmul_compiled(x, qweight, scales, zeros, group_size, library=None, activation_bits=8, bias=None):
    """x (..., K) times the int4 weight stored as qweight [N, Kp/2], scales (and zeros) [N, Kp/G] float16, the
    activations rounded to int8 (activation_bits 8) or int16 (16) per block of 32, plus bias [N] -> (..., N)
    float32, by kernels.c."""
    library = library or compiled_kernels()
    out_features, padded = qweight.shape[0], qweight.shape[1] * 2
    x2d = x.reshape(-1, x.shape[-1]).float().contiguous()  # [M, K]: the kernel lays it out itself
    y = torch.empty(x2d.shape[0], out_features, dtype=torch.float32)
    bias = float32_vector(bias)
    if library.int4_matmul(qweight.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr(),
                           padded // BLOCK, group_shift(group_size), x2d.data_ptr(), x2d.shape[1],
                           x2d.shape[0], y.data_ptr(), out_features, activation_bits,
                           None if bias is None else bias.data_ptr()):
        raise MemoryError("kernels.c: no memory for the rounded activations")
    return y.view(*x.shape[:-1], out_features)


def int8_matmul_compiled(x, qweight, scales, library=None, activation_bits=8, bias=None):
    """x (..., K) times the int8 weight qweight [N, K] (K a multiple of 32), scales [N] float16, the activations
    rounded to int8 (activation_bits 8) or int16 (16) per block of 32, plus bias [N] -> (..., N) float32, by
    kernels.c."""
    library = library or compiled_kernels()
    x2d = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = torch.empty(x2d.shape[0], qweight.shape[0], dtype=torch.float32)
    bias = float32_vector(bias)
    if library.int8_matmul(qweight.data_ptr(), scales.data_ptr(), x2d.shape[1] // BLOCK, x2d.data_ptr(), x2d.shape[0],
                           y.data_ptr(), qweight.shape[0], activation_bits, None if bias is None else bias.data_ptr()):
        raise MemoryError("kernels.c: no memory for the rounded activations")
    return y.view(*x.shape[:-1], qweight.shape[0])


def dequantize_int4_compiled(qweight, scales, zeros, group_size, in_features, start, end, dtype, out=None,
                             library=None):
    """Rows start .. end-1 of the int4 weight stored as qweight [N, Kp/2], scales (and zeros) [N, Kp/G] float16,
    decoded by kernels.c as quant.dequantize_int4 does, in float32, then stored as `dtype` (float32 or bfloat16,
    rounded as .to() rounds): [rows, K], into `out` (rows * K elements) if given."""
    library = library or compiled_kernels()
    rows = end - start
    out = torch.empty(rows, in_features, dtype=dtype) if out is None else out.view(rows, in_features)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    library.dequantize_int4(qweight.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr(),
                            qweight.shape[1] * 2 // BLOCK, group_shift(group_size), start, rows, in_features,
                            out.data_ptr(), dtype == torch.bfloat16)
    return out


def float32_vector(bias):
    """A bias as kernels.c reads it: float32, contiguous (None stays None). Its numbers only: no gradient."""
    if bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()):
        return bias
    return bias.detach().float().contiguous()


def prompt_matmul_compiled(x, qweight, scales, zeros, group_size, bias=None, library=None):
    """x (..., K) times a weight as quant.py stores it (int4: qweight [N, Kp/2] uint8, scales (and zeros) [N, Kp/G];
    int8: qweight [N, K] int8, K a multiple of 32, scales [N]) plus bias -> (..., N) float32, by kernels.c's prompt
    product: float32 throughout, the readable product's numbers summed in another order."""
    library = library or compiled_kernels()
    bits = 8 if qweight.dtype == torch.int8 else 4
    out_features, blocks = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1) // BLOCK
    x2d = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = torch.empty(x2d.shape[0], out_features, dtype=torch.float32)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    bias = float32_vector(bias)
    shift = 0 if bits == 8 else group_shift(group_size)
    if library.prompt_matmul(qweight.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr(), bits,
                             blocks, shift, x2d.data_ptr(), x2d.shape[1], x2d.shape[0], y.data_ptr(), out_features,
                             None if bias is None else bias.data_ptr()):
        raise MemoryError("kernels.c: no memory for the prompt product's panels")
    return y.view(*x.shape[:-1], out_features)


# ----------------------------------------------------------------------------------------------------------------
# 3e. PackedQuantLinear: quant.QuantLinear with the fast paths. Same buffers, same file format, same numbers
#     within the kernels' bfloat16 rounding of the activations.


class PackedQuantLinear(quant.QuantLinear):
    """Decode (<= FAST_PATH_MAX_ROWS rows) through kernels.c's products (reading the stored tensors) or torch's
    packed kernels; larger inputs through kernels.c's prompt product, or dequantized a slice of rows at a time into
    scratch memory (or with int8 activations). For torch's int4 kernel the codes and scales are held once, in its
    layout, when that layout is verified to give them back exactly."""

    kernel_tensors = None  # the packed kernels' private layout, built by prepare_fast_path, never saved
    kernel_layout = None   # an INT4_KERNEL_LAYOUTS name when the codes live only in kernel_tensors[0]
    kernel_holds = ()      # the buffers whose only copy is in kernel_tensors (dropped from _buffers)
    int8_activations = False  # the opt-in W8A8 path for large inputs (set_int8_activations)
    int8_decode = False       # decode with int8 activations, by kernels.c (set_int8_activations)
    int16_decode = False      # decode with 16-bit activations, by kernels.c (choose_compiled_kernels)

    def forward(self, x):  # x: (..., K) -> (..., N)
        rows = x.numel() // self.in_features
        if rows <= FAST_PATH_MAX_ROWS:
            if self.compiled:  # first: ~100 calls in each Imp-3B decode step
                return self.forward_compiled(x)
            if self.fast_path_supported():
                return self.forward_fast(x)
        if self.int8_activations and self.int8_activations_supported(x):
            return self.forward_int8_activations(x)
        if self.prompt_in_c and self.compiled_prompt_applies(x):
            return self.forward_compiled_prompt(x)
        return self.forward_readable(x)

    # -- the stored tensors, wherever they are held ----------------------------------------------------------

    def __getattr__(self, name):
        # `layer.scales` etc. still read as the stored tensor when only the kernel's copy is held: rebuilt (a new
        # tensor at each access; writing to it changes nothing). Checked only after the usual lookup fails.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.__dict__.get("kernel_holds", ()):
                return self.stored_buffer(name)
            raise

    def codes(self, start=0, end=None, out=None):
        """int4 only: the codes of output rows start .. end-1, [rows, Kp] uint8 0..15, unpacked from qweight or read
        back out of the kernel's layout where that holds the only copy (into `out`, if given)."""
        end = self.out_features if end is None else min(end, self.out_features)
        if self.kernel_layout is None:
            return unpack_int4(self.qweight[start:end])
        layout = INT4_KERNEL_LAYOUTS[self.kernel_layout]
        block = layout[0]
        if start % block or (end % block and end != self.out_features):
            raise ValueError(f"rows {start}..{end}: the kernel layout is read in whole blocks of {block} rows")
        # Rows start .. end of the kernel's [N, Kp/2] tensor are exactly the blocks of those output rows.
        return codes_from_kernel_layout(self.kernel_tensors[0][start:end], end - start, layout, out)

    def stored_buffer(self, name, start=0, end=None):
        """Buffer `name` (qweight, scales, zeros) of the stored format, output rows start .. end-1 (default all)."""
        if name not in self.kernel_holds:
            return self._buffers[name] if start == 0 and end is None else self._buffers[name][start:end]
        if name == "qweight":
            return pack_int4(self.codes(start, end))
        # The kernel's [Kp/G, N, 2] bfloat16 (scale, zero) pairs: prepare_fast_path checked that these give the
        # float16 numbers back bit for bit.
        pairs = self.kernel_tensors[1][:, start:end, 0 if name == "scales" else 1]  # [Kp/G, rows]
        return pairs.to(quant.SCALE_DTYPE).t().contiguous()  # [rows, Kp/G]

    def dequantize(self, start=0, end=None, reuse=False):
        """quant.QuantLinear.dequantize from wherever the tensors are held. With `reuse`, the result (and the int4
        codes on the way) lives in scratch() memory that the next such call overwrites."""
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

    def dequantized(self, dtype, start=0, end=None, reuse=False):
        """dequantize(start, end, reuse).to(dtype): by kernels.c in one pass, in quant.dequantize_int4's arithmetic,
        where it applies (int4, the stored buffers held as they are, on the CPU; float32 or bfloat16)."""
        buffers = self._buffers
        if (self.bits != 4 or dtype not in (torch.float32, torch.bfloat16) or compiled_kernels() is None
                or self.kernel_holds or buffers["qweight"].device.type != "cpu"):
            return self.dequantize(start, end, reuse).to(dtype)
        end = self.out_features if end is None else min(end, self.out_features)
        out = scratch("weight", (end - start) * self.in_features, dtype, "cpu") if reuse else None
        return dequantize_int4_compiled(buffers["qweight"], buffers["scales"], buffers.get("zeros"), self.group_size,
                                        self.in_features, start, end, dtype, out)

    def resident_bytes(self) -> int:
        """Bytes this layer holds in memory: its buffers, bias and kernel layouts, each counted once (the int8
        kernel reads qweight itself), a view into a FusedProjection's tensors by its own size."""
        tensors = [*self._parameters.values(), *self._buffers.values(), *(self.kernel_tensors or ())]
        held = {(t.data_ptr(), t.nbytes) for t in tensors if t is not None}
        return sum(nbytes for _, nbytes in held)

    def release_kernel_tensors(self):
        """Forget the kernels' layout (prepare_fast_path builds it again when needed). If it held the only copy of
        the int4 codes or scales, they first go back into their buffers, in the registered order."""
        if self.kernel_holds:
            buffers = {name: self.stored_buffer(name) for name in self.expected_buffers()
                       if name in self._buffers or name in self.kernel_holds}
            buffers.update(self._buffers)  # anything else (check_buffers names it) after them
            self._buffers.clear()
            self._buffers.update(buffers)
        self.kernel_tensors, self.kernel_layout, self.kernel_holds = None, None, ()

    def load_quantized(self, weight):
        self.kernel_tensors, self.kernel_layout, self.kernel_holds = None, None, ()  # built from the old weight
        super().load_quantized(weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.release_kernel_tensors()  # the buffers take the new tensors; the kernel layout is rebuilt from them
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias, then the buffers held
        if self.kernel_holds:  # codes or scales held only in the kernel's layout: saved in the stored format,
            for name in self.expected_buffers():  # every buffer in its registered order: the same keys, same order
                key = prefix + name
                destination[key] = destination.pop(key) if name not in self.kernel_holds else self.stored_buffer(name)

    def _apply(self, fn, recurse=True):
        self.release_kernel_tensors()  # built for this device: rebuilt (by prepare_fast_path) after the move
        return super()._apply(fn, recurse)

    # -- the paths --------------------------------------------------------------------------------------------

    def forward_readable(self, x):
        """Dequantize, then F.linear, a slice of output rows at a time (quant.SLICE_WEIGHTS weights): fc1 at a
        770-token prefill holds four 26 MB slices in turn instead of 105 MB at once. Without autograd each slice
        lives in scratch memory and its product goes straight into its columns of one output."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        slices = quant.row_slices(self.out_features, self.in_features)
        reuse = not torch.is_grad_enabled()  # with autograd, F.linear may keep the weight for the backward pass
        if len(slices) == 1:
            return F.linear(x, self.dequantized(x.dtype, reuse=reuse), bias)
        if not reuse:  # autograd does not go through out= ops: the slices' products, then one torch.cat of them
            return torch.cat([F.linear(x, self.dequantized(x.dtype, start, end),
                                       None if bias is None else bias[start:end]) for start, end in slices], dim=-1)
        x2d, out = x.reshape(-1, self.in_features), None
        for start, end in slices:
            weight = self.dequantized(x.dtype, start, end, reuse).t()
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
        if scales.device.type != "cpu":
            return False
        if self.decodes_in_c:
            return True
        return (packed_kernels_available()[self.bits]
                and self.in_features % 16 == 0 and (self.bits == 8 or self.out_features % 16 == 0))

    def prepare_fast_path(self):
        """Build the kernels' private layout from the stored buffers, once.
        int8: the kernel reads our int8 [N, K] weight as it is: one copy, shared.
        int4: the converter reorders the codes. When codes_from_kernel_layout undoes that order exactly on this very
        layer, the kernel's copy becomes the only one and `qweight` is dropped (0.5 bytes per weight). The kernel
        wants bfloat16 (scale, zero) pairs; quant.kernel_exact made every scale and zero a number both float16 and
        bfloat16 hold, so when the pairs give the float16 buffers back bit for bit, those are dropped too. A file
        whose scales bfloat16 does not hold (an older quant.py) keeps them beside the pairs."""
        if self.kernel_tensors is not None:
            return self.kernel_tensors
        if self.decodes_in_c:  # kernels.c reads the stored buffers as they are
            for name in self.expected_buffers():
                self._buffers[name] = self._buffers[name].contiguous()
            self.kernel_tensors = tuple(self._buffers[name] for name in self.expected_buffers())  # what it reads
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
        if self.kernel_tensors is None:
            self.prepare_fast_path()  # built once, then reused
        if self.decodes_in_c:  # (prepare_fast_path made the kernel tensors kernels.c's)
            return self.forward_compiled(x)
        weight, scales = self.kernel_tensors
        x2d = aligned(x.reshape(-1, self.in_features).to(KERNEL_DTYPE))  # (M, K): the kernels take 2-D inputs only
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x2d, weight, scales)
        else:
            padding = padded_in_features(self.in_features, 4, self.group_size) - self.in_features
            if padding:
                x2d = F.pad(x2d, (0, padding))
            if not scales.is_contiguous():  # a view into a FusedProjection's pairs, called on its own
                scales = scales.contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, weight, self.group_size, scales)
        y = y.view(*x.shape[:-1], self.out_features)  # (..., N) in the kernels' bfloat16
        bias = self._parameters.get("bias")  # not self.bias: __getattr__ above is slower
        if bias is not None and bias.dtype == x.dtype and x.dtype in (torch.float32, KERNEL_DTYPE):
            return torch.add(y, bias)  # type promotion: bfloat16 + float32 sums in (and returns) float32
        y = y.to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)

    @property
    def decodes_in_c(self) -> bool:
        """Whether decode goes through kernels.c, with int8 or 16-bit activations (choose_compiled_kernels)."""
        return (self.int8_decode or self.int16_decode) and compiled_kernels() is not None

    @property
    def prompt_in_c(self) -> bool:
        """Whether larger inputs go through kernels.c's float32 prompt product: where it decodes them and it pays."""
        return self.decodes_in_c and compiled_prompt_pays()

    @property
    def compiled(self) -> bool:
        """Whether decode reads the stored buffers through kernels.c (no kernel layout)."""
        return self.decodes_in_c and self.kernel_tensors is not None

    def forward_compiled(self, x):  # kernels.c, from the stored buffers; float32 sums, in x's dtype
        buffers, bias, bits = self._buffers, self._parameters.get("bias"), 8 if self.int8_decode else 16
        # the bias added by the kernel, unless autograd wants its gradient (the kernel has no backward)
        in_c = None if bias is not None and bias.requires_grad and torch.is_grad_enabled() else bias
        if self.bits == 4:
            y = int4_matmul_compiled(x, buffers["qweight"], buffers["scales"], buffers.get("zeros"), self.group_size,
                                     activation_bits=bits, bias=in_c)
        else:
            y = int8_matmul_compiled(x, buffers["qweight"], buffers["scales"], activation_bits=bits, bias=in_c)
        return (y if in_c is bias else y + bias).to(x.dtype)

    def compiled_prompt_applies(self, x) -> bool:
        # The stored buffers on the CPU and no autograd (the product has no backward).
        return (not torch.is_grad_enabled() and x.device.type == "cpu"
                and self._buffers["qweight"].device.type == "cpu")

    def forward_compiled_prompt(self, x):
        """kernels.c's prompt product from the stored buffers: each weight decoded once, in cache, straight into
        the float32 layout its matrix product reads; the readable path's numbers in another order of sums."""
        y = prompt_matmul_compiled(x, self.qweight, self.scales, self._buffers.get("zeros"), self.group_size,
                                   self._parameters.get("bias"))
        return y.to(x.dtype)

    def int8_activations_supported(self, x) -> bool:
        # On the CPU only, and not where autograd needs a gradient through x: the rounding has none.
        return (x.device.type == "cpu" and int8_matmul_available()
                and not (torch.is_grad_enabled() and x.requires_grad))

    def int8_weight(self, start=0, end=None):
        """int4 only: output rows start .. end-1 requantized to int8 per row, in scratch memory (valid until the
        next call): (codes int8 [rows, K], scales float32 [rows]), w ~ codes * scale, for _int_mm. About 2x cheaper
        than dequantize() then quant.quantize_int8:
        - the row's largest |w| follows from its groups' (scale, zero) alone: |w| <= max(|zero - 8 scale|,
          |zero + 7 scale|) (symmetric: 8 |scale|). No pass over the weight to find it.
        - dividing the scales and zeros by the row's int8 step first, dequantize_int4_codes writes the weight in
          units of that step (|value| <= 127): round it and cast, and it is the int8 code.
        The second rounding moves a weight by at most half an int8 step: 1/32 of the int4 step of the row's
        largest group."""
        end = self.out_features if end is None else min(end, self.out_features)
        rows, padded = end - start, padded_in_features(self.in_features, 4, self.group_size)
        device = self.kernel_tensors[1].device if self.kernel_holds else self.scales.device
        scales = self.stored_buffer("scales", start, end).float()  # [rows, Kp/G]
        zeros = self.stored_buffer("zeros", start, end).float() if self.scheme == "asymmetric" else None
        reach = 8 * scales.abs() if zeros is None else torch.maximum((zeros - 8 * scales).abs(),
                                                                      (zeros + 7 * scales).abs())
        step = reach.amax(dim=1) / 127  # [rows]: the int8 step of each row
        step.masked_fill_(step == 0, 1.0)  # an all-zero row: codes 0 with any step
        buffer = scratch("codes", rows * padded, torch.uint8, device)
        codes = self.codes(start, end, buffer)
        zeros_in_steps = None if zeros is None else zeros / step[:, None]
        units = dequantize_int4_codes(codes, scales / step[:, None], zeros_in_steps, self.group_size,
                                      self.in_features, scratch("weight", rows * padded, torch.float32, device))
        # The int8 codes go where the int4 codes were (dead once dequantized): no third buffer of the slice's size.
        weight_codes = buffer.view(torch.int8)[:rows * self.in_features].view(rows, self.in_features)
        return weight_codes.copy_(units.round_()), step  # |units| <= 127 up to rounding ulps: no clamp needed

    def forward_int8_activations(self, x):
        """W8A8: int8 activations (one scale per row, quantized at this call) times int8 weights (one scale per
        output row) with torch._int_mm, rescaled to float32, a slice of output rows at a time."""
        x2d = x.reshape(-1, self.in_features)
        codes, row_scale = quantize_activations(x2d)
        out = torch.empty(x2d.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        bias = None if self.bias is None else self.bias.float()
        scales = self.scales.float() if self.bits == 8 else None
        for start, end in quant.row_slices(self.out_features, self.in_features):
            if self.bits == 8:  # the stored int8 weight and its per-row scales, as they are
                weight_codes, channel_scale = self.qweight[start:end], scales[start:end]
            else:
                weight_codes, channel_scale = self.int8_weight(start, end)  # int8 [rows, K], float32 [rows]
            # _int_mm wants the weight as [K, N]: the transposed view of our row-major [N, K] (column-major, the
            # layout oneDNN's int8 GEMM reads fastest; a contiguous [K, N] copy was no faster)
            sums = scratch("a8 sums", x2d.shape[0] * (end - start), torch.int32, "cpu").view(x2d.shape[0], end - start)
            acc = torch._int_mm(codes, weight_codes.t(), out=sums)
            rescale_int32_(acc, row_scale, channel_scale, None if bias is None else bias[start:end], out[:, start:end])
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        held = f", codes held in the {self.kernel_layout} kernel layout only" if self.kernel_layout else ""
        held += ", scales held in the kernel's bfloat16 pairs only" if "scales" in self.kernel_holds else ""
        return super().extra_repr() + held
