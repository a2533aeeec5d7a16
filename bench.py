#!/usr/bin/env python3
"""
bench.py: how fast is nanoImp on this CPU, and how close to the memory-bandwidth limit does it decode?

    python bench.py                                    # Imp-3B shapes, random weights, 4 precisions, 2 threads
    python bench.py --dtypes int4 --json int4.json     # one precision
    python bench.py --dtypes float32 bfloat16 --compare   # also time transformers with the same weights
    python bench.py --image-size 196                   # the mobile variant (196 px -> 196 image tokens)
    python bench.py --quick --json out.json            # a ~10M-parameter model: the same measurements in seconds
    python bench.py --family 2b 3b 4b --dtypes int4    # the three Imp members (Qwen1.5, Phi-2, Phi-3 decoders)
    python bench.py --dtypes int4 int4+a8              # int4, and int4 with int8 activations (prefill, vision)

One "query" is what the paper's Table 4 times: encode one image (T_VE), prefill 729 image + 41 text tokens
(S_prompt = 770 / prefill seconds), then generate 64 tokens greedily (S_gen = 64 / decode seconds); the
end-to-end figure is total = T_VE + prefill seconds + decode seconds. Model building is not timed.

Each precision runs in a fresh subprocess (this script re-invoked with --worker), so that its peak RSS is its
own; the model is built directly in its dtype on the meta device and filled with random numbers (std 0.02,
LayerNorm weights 1), and int8 / int4 layers are quantized one at a time (quant.py), so no float32 copy of the
whole model ever exists. Every row runs with the fast layer on (kernels.enable), as infer.py does. Peak RSS is
the high-water mark of the query itself (reset after building). int8 / int4 rows keep their KV cache in float16
when they compute in float32 (--cache-dtype; imp.KVCache). The opt-in rows int8+a8 / int4+a8 are the same models
with int8 activations as infer.py --int8-activations runs them: inputs of more than kernels.FAST_PATH_MAX_ROWS rows
(prefill, vision tower) as int8 x int8 GEMMs on CPUs with int8 dot-product instructions (VNNI, AMX), and decode
through kernels.c's int4 / int8 x int8 products on x86 CPUs, where it compiled.

Decode is memory-bound: every new token reads all Linear weights of the language model (lm_head included, the
embedding not; quantized ones in the packed kernel's layout, which is what it reads) plus the KV cache. A stream
test (torch.sum, torch.mv and torch.amax over a large float32 tensor, the best of 5 runs of each, same threads)
measures the read bandwidth right before each precision runs, and
    roofline tok/s = bandwidth / bytes read per token,   roofline_fraction = measured tok/s / roofline tok/s.
On a shared machine bandwidth swings from minute to minute: compare figures taken in one run.

--compare times transformers' PhiForCausalLM (SDPA attention) + SiglipVisionModel (26 layers) holding the very
same tensors (shared, not copied), with the same prompt, greedy decode with a DynamicCache, and our connector.
"""

import argparse
import ctypes
import errno
import gc
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn

import imp
import infer
import kernels
import quant

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISIONS = ("float32", "bfloat16", "int8", "int4")
# Opt-in rows: the same int8 / int4 model with int8 activations (kernels.py: int8 x int8 GEMMs for prefill and the
# vision tower on VNNI / AMX; decode through kernels.c on x86 where it compiled). Not in the default list: they
# change the numbers a little, and a full-size row takes minutes.
A8_PRECISIONS = ("int8+a8", "int4+a8")
TEXT_TOKENS = 41       # the paper's prompt: 41 text tokens around one <image> (729 image tokens at 384 px)
NEW_TOKENS = 64
GB = 1e9

# Reference figures measured on a 2-core AMD Zen 4 with native bfloat16, and the targets bench.py checks (below).
REFERENCE = {"transformers float32": dict(t_ve_s=4.64, prompt_tok_s=22.0, gen_tok_s=1.29, total_s=90.0),
             "transformers bfloat16": dict(t_ve_s=2.40, prompt_tok_s=50.7, gen_tok_s=1.77, total_s=49.0),
             "llama.cpp Q4_0 (+ hf bf16 vision)": dict(t_ve_s=2.40, prompt_tok_s=33.7, gen_tok_s=15.0, total_s=29.5)}
LLAMA_CPP_Q4_0_GEN = (13.9, 18.5)

# A small model for --quick (CI, smoke checks): real head dims (Phi 80 with 32 rotary, SigLIP 64), every Linear a
# multiple of 64 wide so that int4 groups of 64 fit, 64 image tokens.
QUICK_CONFIG = dict(vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=5, num_attention_heads=3,
                                image_size=112, patch_size=14),
                    text=dict(vocab_size=4096, hidden_size=320, intermediate_size=1280, num_hidden_layers=4,
                              num_attention_heads=4, rotary_dim=32))
# The Imp family (paper section 4.1), one recipe on three decoders; --quick keeps their head dims (128, 96).
MEMBERS = {"2b": "Imp-2B (Qwen1.5-1.8B)", "3b": "Imp-3B (Phi-2)", "4b": "Imp-4B (Phi-3-mini)"}
QUICK_LLAMA = {"2b": dict(hidden_size=256, num_attention_heads=2), "4b": dict(hidden_size=192, num_attention_heads=2)}

EXAMPLES = """examples:
  python bench.py                                  full Imp-3B shapes, float32 bfloat16 int8 int4 (minutes)
  python bench.py --dtypes int4 bfloat16 --compare --json bench.json
  python bench.py --image-size 196                 Imp-3B-196, the mobile variant
  python bench.py --model imp-v1-3b --dtypes int4  real weights (quantized while loading)
  python bench.py --quick --json out.json          small config, all precisions, seconds
  python bench.py --family 2b 3b 4b --dtypes int4 --new-tokens 16   the three members, one table each
  python bench.py --dtypes int4 int4+a8            int4, and int4 with int8 activations (prefill, vision)
  python bench.py --dtypes int4 --llama-cpp llama.json   int4 decode against llama.cpp's Q4_0 on this machine,
                                                   measured by tools/llama_cpp_reference.py --json llama.json

JSON (--json FILE): {"machine": {...}, "results": [one object per precision with dtype, t_ve_s, prompt_tok_s,
gen_tok_s, total_s, weight_bytes (as stored), resident_weight_bytes (in memory), peak_rss_bytes, cache_dtype,
roofline_fraction, ...], "transformers": [...] with --compare, "llama_cpp": [...] with --llama-cpp}"""


class BenchError(Exception):
    """Anything the user can fix: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchError(f"{message} (see --help)")


def parse_arguments(argv):
    parser = Parser(prog="bench.py", description="Benchmark nanoImp (Imp-3B shapes, or --family) on this CPU.", epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=PRECISIONS + A8_PRECISIONS, default=list(PRECISIONS),
                        metavar="DTYPE", help=f"precisions to run, any of {' '.join(PRECISIONS + A8_PRECISIONS)} "
                        f"(default: {' '.join(PRECISIONS)}; +a8: int8 activations, as infer.py --int8-activations)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--image-size", type=int, choices=(384, 196), default=384,
                        help="384 (Imp-3B, 729 image tokens) or 196 (Imp-3B-196, 196 tokens)")
    parser.add_argument("--family", nargs="+", choices=tuple(MEMBERS), default=["3b"], metavar="MEMBER",
                        help="Imp members to time with random weights: 2b (Qwen1.5), 3b (Phi-2), 4b (Phi-3-mini); "
                             "default 3b")
    parser.add_argument("--model", metavar="DIR", help="an Imp folder to load instead of random weights")
    parser.add_argument("--quick", action="store_true", help="a small config: the same measurements in seconds")
    parser.add_argument("--compare", action="store_true",
                        help="also time transformers (PhiForCausalLM + SiglipVisionModel) for float32 / bfloat16")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help=f"tokens to generate (default {NEW_TOKENS})")
    parser.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128),
                        help="int4 group size (default 32, symmetric: the Imp-3B file is 1.91 GB with the vision tower quantized)")
    parser.add_argument("--no-quant-vision", action="store_true",
                        help="keep the vision tower and connector in float for int8 / int4 (default: quantize them)")
    parser.add_argument("--quant-dtype", choices=("auto",) + tuple(FLOAT_DTYPES), default="auto",
                        help="float dtype of int8 / int4 models (default auto: kernels.best_cpu_dtype(), bfloat16 only "
                             "where the CPU has native bfloat16)")
    parser.add_argument("--cache-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="KV cache dtype (default auto: the model's float dtype, but float16 for an int8 / int4 "
                             "model computing in float32: half the memory, see imp.KVCache)")
    parser.add_argument("--llama-cpp", metavar="JSON", help="llama.cpp measured on this machine by "
                        "tools/llama_cpp_reference.py: the int4 decode target then compares with its Q4_0 here")
    parser.add_argument("--worker", choices=PRECISIONS + A8_PRECISIONS + tuple(f"hf-{d}" for d in FLOAT_DTYPES),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.new_tokens < 1:
        raise BenchError("--threads and --new-tokens must be at least 1")
    if args.model and not os.path.isdir(args.model):
        raise BenchError(f"{args.model}: no such model folder")
    if args.compare and args.family != ["3b"]:
        raise BenchError("--compare times transformers' Phi-2 only: use it with --family 3b")
    if args.model and args.quick:
        raise BenchError("--quick builds its own small model: drop --model")
    if args.model and not args.worker:
        check_model_folder(args.model)
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
        raise BenchError(f"--json {args.json}: must be a file in an existing folder")
    return args


def check_model_folder(path):
    """The folder's config and safetensors headers, read before any worker starts (no tensor is loaded): a bad
    folder is one line and exit code 2, not one failed row per precision."""
    try:
        checkpoint = imp.open_checkpoint(path)
        if checkpoint.layout not in ("imp", "imp-legacy"):
            raise BenchError(f"{path}: holds a {checkpoint.layout} checkpoint, not an Imp one")
        imp.parse_config(checkpoint, imp.ImpConfig)
        if "quantization" in checkpoint.config:
            quant.check_config(checkpoint.config["quantization"])
    except (imp.CheckpointError, ValueError) as error:
        raise BenchError(str(error)) from None


# ----------------------------------------------------------------------------------------------------------------
# Measurements shared by every worker.


def memory_bandwidth(gigabytes: float, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s over a float32 tensor of that size (far past the caches): the best run of the best
    of several readers. One reader alone understates what the memory gives (torch.sum's reduction is not the
    fastest loop over memory), and a roofline is only meaningful against the best bandwidth this machine reaches."""
    x = torch.empty(int(gigabytes * GB / 4), dtype=torch.float32).fill_(1.0)
    matrix = x[:x.numel() // 4096 * 4096].view(-1, 4096)  # read as a decode step reads a weight: matrix x vector
    vector = torch.ones(4096)
    readers = (lambda: x.sum(), lambda: torch.mv(matrix, vector), lambda: x.amax())
    best = math.inf
    for _ in range(repeats):
        for read in readers:
            started = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - started)
    nbytes = x.numel() * 4
    return nbytes / best


def trim_memory():
    """Give freed heap memory back to the OS (glibc), so the peak-RSS reset below starts from what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: the lifetime peak (includes building the model)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, quant.QuantizedModule)


def tensor_bytes(module: nn.Module) -> int:
    """The weights as stored (a checkpoint's size): parameters and buffers, each quantized layer by its stored
    format (an int4 QuantLinear may hold its codes only in the packed kernel's layout, which is not a buffer)."""
    total = 0
    for sub in module.modules():
        if is_quantized(sub):
            total += sub.stored_bytes()
        else:  # its own tensors only: modules() visits the children on their own
            total += sum(t.numel() * t.element_size() for t in [*sub._parameters.values(), *sub._buffers.values()]
                         if t is not None)
    return total


def resident_weight_bytes(module: nn.Module) -> int:
    """What the weights occupy in memory: as stored, plus what the packed kernels' layouts add. int4: the bfloat16
    (scale, zero) pairs, 4 bytes per group, in place of the float16 scales (2 bytes; beside them where quant.py
    could not verify that they rebuild exactly), and a second copy of the 4-bit codes only where it could not
    verify its inverse of the kernel's layout."""
    return tensor_bytes(module) + sum(sub.resident_bytes() - sub.stored_bytes() for sub in module.modules()
                                      if isinstance(sub, kernels.PackedQuantLinear))


def decode_bytes_per_token(llm: nn.Module, depth: int, kv_element_size: int) -> int:
    """Bytes one decode step must read: every Linear-like layer of the language model (lm_head included, the
    embedding lookup not), as the decode reads it (a quantized layer's kernel layout once built: for int4 the
    codes and bfloat16 (scale, zero) pairs; else its stored tensors), plus the keys and values cached at `depth`."""
    linear = 0
    for m in llm.modules():
        if isinstance(m, nn.Linear):
            linear += tensor_bytes(m)
        elif isinstance(m, quant.QuantLinear):
            kernel = getattr(m, "kernel_tensors", None) or ()
            bias = m.bias.nbytes if m.bias is not None else 0
            linear += sum(t.nbytes for t in kernel) + bias if kernel else m.stored_bytes()
    config = llm.config
    kv = 2 * config.num_hidden_layers * depth * config.hidden_size * kv_element_size
    return linear + kv


# ----------------------------------------------------------------------------------------------------------------
# Building the model: random weights in the target dtype without a float32 detour, or loaded from a folder.


def make_config(args) -> imp.ImpConfig:
    family = args.family[0]
    if family != "3b":
        return member_config(family, args.quick, args.image_size)
    if args.quick:
        return imp.ImpConfig(vision=imp.VisionConfig(**QUICK_CONFIG["vision"]), text=imp.PhiConfig(**QUICK_CONFIG["text"]),
                             image_token_index=QUICK_CONFIG["text"]["vocab_size"] - 1,
                             eos_token_id=QUICK_CONFIG["text"]["vocab_size"] - 2, pad_token_id=0)
    return imp.ImpConfig(vision=imp.VisionConfig(image_size=args.image_size))


def members_named(families) -> str:
    """["3b"] -> "Imp-3B"; ["2b", "4b"] -> "Imp-2B, Imp-4B"."""
    return ", ".join(MEMBERS[family].split(" ")[0] for family in families)


def member_config(family: str, quick: bool, image_size: int) -> imp.ImpConfig:
    """Imp-2B / Imp-4B shapes (the releases' ids); quick: a small model with the same head dims."""
    text = imp.LlamaConfig() if family == "2b" else imp.LlamaConfig.phi3()
    defaults = imp.FAMILY_DEFAULTS[text.family]
    vision = imp.VisionConfig(image_size=image_size)
    if quick:
        vision = imp.VisionConfig(**QUICK_CONFIG["vision"])
        text = imp.LlamaConfig(**dict(vars(text), vocab_size=4096, intermediate_size=1280, num_hidden_layers=4,
                                      num_key_value_heads=2, **QUICK_LLAMA[family]))
    image_token = text.vocab_size - 1 if quick else defaults["image_token_index"]
    return imp.ImpConfig(vision=vision, text=text, image_token_index=image_token,
                         eos_token_id=text.vocab_size - 2 if quick else defaults["eos_token_id"],
                         pad_token_id=0 if quick else defaults["pad_token_id"],
                         image_aspect_ratio=defaults["image_aspect_ratio"], max_length=defaults["max_length"])


@torch.no_grad()
def materialize(module: nn.Module, generator: torch.Generator):
    """Replace every meta tensor of `module` (recursively) by a CPU one: LayerNorm weights 1 and biases 0,
    everything else normal(0, 0.02). Tensors already on the CPU are left alone."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_meta:
                    continue
                value = torch.empty(tensor.shape, dtype=tensor.dtype)
                if not tensor.is_floating_point():  # an index buffer (transformers' position_ids): 0, 1, 2, ...
                    value.copy_(torch.arange(tensor.shape[-1]).expand(tensor.shape))
                elif isinstance(sub, (nn.LayerNorm, imp.RMSNorm)):
                    value.fill_(1.0 if name == "weight" else 0.0)
                else:
                    value.normal_(0.0, 0.02, generator=generator)
                store[name] = nn.Parameter(value, requires_grad=False) if store is sub._parameters else value


def quant_settings(args, precision):  # "int4" or "int4+a8" -> bits 4
    return dict(bits=int(precision.split("+")[0][3:]), group_size=args.group_size,
                include_vision=not args.no_quant_vision)


def quant_float_dtype(args) -> torch.dtype:
    return kernels.best_cpu_dtype() if args.quant_dtype == "auto" else FLOAT_DTYPES[args.quant_dtype]


def cache_dtype(args, model, float_dtype) -> torch.dtype:
    """--cache-dtype, or auto: quant.default_cache_dtype (float16 for the int8/int4 rows computing in float32;
    float32 / bfloat16 rows keep the model's dtype, as transformers does in --compare)."""
    if args.cache_dtype != "auto":
        return {"float16": torch.float16, **FLOAT_DTYPES}[args.cache_dtype]
    return quant.default_cache_dtype(model) or float_dtype


def build_random_model(config: imp.ImpConfig, dtype: torch.dtype, quantization: dict | None, seed: int = 0):
    """Imp with random weights, built on the meta device and filled module by module in `dtype`. With
    `quantization`, each planned Linear / Embedding is filled and quantized at once, one at a time."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = imp.Imp(config)
    model.to(dtype)  # on the meta device: shapes and dtypes only
    if quantization:
        settings = quant.quantization_config(quantization["bits"], quantization["group_size"],
                                             quantization["include_vision"])

        def fill_then_quantize(name, module, bits):  # quant.quantize_model's step, with the module filled first
            materialize(module, generator)
            return quant.quantize_module(module, bits, settings["group_size"], settings["scheme"])

        quant.replace_modules(model, settings, fill_then_quantize)  # one module at a time: no float copy of it all
    materialize(model, generator)
    if quantization:
        quant.finish_loading(model)
    return model.eval()


def load_model(args, precision):
    """--model: load the folder in the float dtype of this precision; quantize while loading for int8 / int4."""
    stored = imp.open_checkpoint(args.model).config.get("quantization")  # checked by check_model_folder
    if stored and precision.split("+")[0] != f"int{stored.get('bits')}":
        raise BenchError(f"{args.model} is already quantized to int{stored.get('bits')}: run --dtypes "
                         f"int{stored.get('bits')} only")
    dtype = FLOAT_DTYPES.get(precision) or quant_float_dtype(args)
    try:
        model = quant.load(args.model, dtype=dtype, with_tokenizer=False)
    except imp.CheckpointError as error:
        raise BenchError(str(error)) from None
    if precision.startswith("int") and not stored:
        s = quant_settings(args, precision)
        quant.quantize_model(model, bits=s["bits"], group_size=s["group_size"], include_vision=s["include_vision"])
    return model.eval()


def make_inputs(config: imp.ImpConfig, text_tokens: int, seed: int = 0):
    """A prompt of `text_tokens` random text ids with one <image> after the system prompt (~ where the template
    puts it), and one random image in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, min(config.text.vocab_size, 50000) - 3, (1, text_tokens), generator=generator)
    input_ids = torch.cat([text[:, :min(30, text_tokens)], torch.tensor([[config.image_token_index]]),
                           text[:, min(30, text_tokens):]], dim=1)
    size = config.vision.image_size
    pixel_values = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    return input_ids, pixel_values


# ----------------------------------------------------------------------------------------------------------------
# Workers: one precision each, in a fresh process; the result is one JSON line on stdout.


def run_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth(0.125 if args.quick else 1.0)  # before the model exists: not part of its peak RSS
    if args.worker.startswith("hf-"):
        return run_transformers_worker(args, FLOAT_DTYPES[args.worker[3:]], bandwidth)
    precision = args.worker
    float_dtype = FLOAT_DTYPES.get(precision) or quant_float_dtype(args)
    build_started = time.perf_counter()
    if args.model:
        model = load_model(args, precision)
        config = model.config
    else:
        config = make_config(args)
        quantization = quant_settings(args, precision) if precision.startswith("int") else None
        model = build_random_model(config, float_dtype, quantization)
    int8_activations = precision.endswith("+a8")
    if "unavailable" in kernels.enable(model, int8_activations=int8_activations):  # as infer.py --int8-activations
        raise BenchError("torch._int_mm does not work on this torch build: no int8-activation rows")
    build_seconds = time.perf_counter() - build_started
    input_ids, pixel_values = make_inputs(config, TEXT_TOKENS)
    kv_dtype = cache_dtype(args, model, float_dtype)

    # Warm-up (kernel selection, first-touch allocations): the whole query with --quick, where it costs nothing
    # and first-call overheads would distort the figures; a short text-only prompt at full size.
    if args.quick:
        list(model.generate(input_ids, pixel_values, max_new_tokens=2, stop_ids=[], cache_dtype=kv_dtype))
    else:
        list(model.generate(input_ids[:, :8].masked_fill(input_ids[:, :8] == config.image_token_index, 1), None,
                            max_new_tokens=2, stop_ids=[], cache_dtype=kv_dtype))
    trim_memory()
    exact_peak = reset_peak_rss()
    stats = {}
    tokens = list(infer.generate_with_stats(model, input_ids, pixel_values, stats, max_new_tokens=args.new_tokens,
                                            stop_ids=[], cache_dtype=kv_dtype))
    peak = peak_rss_bytes()
    if stats["generated_tokens"] != args.new_tokens or len(tokens) != args.new_tokens:
        raise BenchError(f"generated {len(tokens)} tokens, expected {args.new_tokens}")

    # Bandwidth swings on a shared machine: measure again after the query and take the better of the two, so that
    # the roofline is what this machine reached in this run (a conservative fraction), not a momentary low.
    bandwidth_after = memory_bandwidth(0.125 if args.quick else 1.0)
    bandwidth = max(bandwidth, bandwidth_after)
    depth = stats["prompt_tokens"] + args.new_tokens // 2  # the mean depth of the decoded tokens
    bytes_per_token = decode_bytes_per_token(model.llm, depth, kv_dtype.itemsize)
    gen_tok_s = stats["generated_tokens"] / stats["generate_seconds"]
    roofline = bandwidth / bytes_per_token
    return dict(dtype=precision, compute_dtype=str(float_dtype).replace("torch.", ""),
                cache_dtype=str(kv_dtype).replace("torch.", ""), resident_weight_bytes=resident_weight_bytes(model),
                t_ve_s=stats["vision_seconds"], prompt_tokens=stats["prompt_tokens"],
                prompt_s=stats["prompt_seconds"], prompt_tok_s=stats["prompt_tokens"] / stats["prompt_seconds"],
                generated_tokens=stats["generated_tokens"], gen_s=stats["generate_seconds"], gen_tok_s=gen_tok_s,
                total_s=stats["vision_seconds"] + stats["prompt_seconds"] + stats["generate_seconds"],
                weight_bytes=tensor_bytes(model), peak_rss_bytes=peak, peak_rss_exact=exact_peak,
                bytes_per_token=bytes_per_token, bandwidth_bytes_s=bandwidth, roofline_tok_s=roofline,
                roofline_fraction=gen_tok_s / roofline, build_s=build_seconds, threads=torch.get_num_threads(),
                quantization=quant_settings(args, precision) if precision.startswith("int") else None,
                int8_activations=int8_activations)


def run_transformers_worker(args, dtype, bandwidth) -> dict:
    """transformers' PhiForCausalLM + SiglipVisionModel holding our random tensors, timed on the same query."""
    try:
        import transformers
        from transformers import DynamicCache
    except ImportError:
        raise BenchError("--compare needs transformers (pip install transformers)") from None
    config = make_config(args)
    ours = build_random_model(config, dtype, None) if not args.model else load_model(args, str(dtype)[6:])
    config = ours.config
    phi, siglip = build_transformers_models(transformers, ours, config, dtype)
    connector = ours.connector
    input_ids, pixel_values = make_inputs(config, TEXT_TOKENS)
    pixel_values = pixel_values.to(dtype)

    def query(new_tokens):
        started = time.perf_counter()
        with torch.inference_mode():
            hidden = siglip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
            features = connector(hidden)
            vision_done = time.perf_counter()
            embeddings, _ = ours.splice(input_ids, features)  # the same splice: an embedding lookup and a cat
            cache = DynamicCache(config=phi.config)
            out = phi(inputs_embeds=embeddings, past_key_values=cache, use_cache=True, logits_to_keep=1)
            prompt_done = time.perf_counter()
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(new_tokens):  # greedy, one forward per new token (the first comes from the prefill)
                out = phi(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            done = time.perf_counter()
        return vision_done - started, embeddings.shape[1], prompt_done - vision_done, done - prompt_done

    if args.quick:  # warm-up, as for ours
        query(2)
    else:
        with torch.inference_mode():
            phi(input_ids=input_ids[:, :8].clamp(max=config.text.vocab_size - 1), use_cache=False)
    trim_memory()
    exact_peak = reset_peak_rss()
    vision_s, prompt_tokens, prompt_s, gen_s = query(args.new_tokens)
    peak = peak_rss_bytes()
    return dict(dtype=str(dtype).replace("torch.", ""), implementation=f"transformers {transformers.__version__}",
                t_ve_s=vision_s, prompt_tokens=prompt_tokens, prompt_s=prompt_s, prompt_tok_s=prompt_tokens / prompt_s,
                generated_tokens=args.new_tokens, gen_s=gen_s, gen_tok_s=args.new_tokens / gen_s,
                total_s=vision_s + prompt_s + gen_s, weight_bytes=tensor_bytes(ours), peak_rss_bytes=peak,
                peak_rss_exact=exact_peak, bandwidth_bytes_s=bandwidth, threads=torch.get_num_threads())


def build_transformers_models(transformers, ours, config: imp.ImpConfig, dtype):
    """Their models on the meta device, then our tensors assigned in (shared storage, no copy), by the official
    checkpoint names (imp.official_names). Tensors they have and we do not (post_layernorm, rotary tables) are
    made on the CPU."""
    vision_config = transformers.SiglipVisionConfig(
        **{k: v for k, v in config.vision.to_dict().items() if k not in ("model_type", "num_hidden_layers")},
        num_hidden_layers=config.vision.num_layers_kept, vision_use_head=False, attn_implementation="sdpa")
    phi_config = transformers.PhiConfig(**config.text.to_dict(), attn_implementation="sdpa")
    phi_config.pad_token_id, phi_config.eos_token_id = config.pad_token_id, config.eos_token_id
    with torch.device("meta"):
        phi = transformers.PhiForCausalLM(phi_config).to(dtype)
        siglip = transformers.SiglipVisionModel(vision_config).to(dtype)
    rename = imp.official_names(config)
    vision_prefix = "model.vision_tower.vision_tower.vision_model."
    phi_keys, siglip_keys = set(phi.state_dict()), set(siglip.state_dict())
    phi_state, siglip_state = {}, {}
    for name, tensor in ours.state_dict().items():
        if name.startswith("connector."):
            continue
        key = rename(name)
        if key.startswith(vision_prefix):
            key = key[len(vision_prefix):]
            key = key if key in siglip_keys else "vision_model." + key
            siglip_state[key] = tensor
        else:
            phi_state[key] = tensor
    for model, state, keys in ((phi, phi_state, phi_keys), (siglip, siglip_state, siglip_keys)):
        unknown = set(state) - keys
        if unknown:
            raise BenchError(f"cannot map our weights onto transformers' {type(model).__name__}: {sorted(unknown)[:3]}")
        model.load_state_dict(state, strict=False, assign=True)
    # What is still on the meta device: post_layernorm (weights 1, bias 0) and the rotary inverse frequencies.
    for model in (phi, siglip):
        for name, module in list(model.named_modules()):
            if any(t.is_meta for t in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
                parent_name, _, child = name.rpartition(".")
                fresh = type(module)(config=module.config if hasattr(module, "config") else phi.config)
                setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
        materialize(model, torch.Generator().manual_seed(1))
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:
            raise BenchError(f"transformers model still has meta tensors: {leftover[:3]}")
        model.eval()
    return phi, siglip


# ----------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per precision, then the tables.


def run_in_subprocess(args, worker: str, family: str = "3b") -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--family", family, "--threads", str(args.threads),
               "--image-size", str(args.image_size), "--new-tokens", str(args.new_tokens),
               "--group-size", str(args.group_size), "--quant-dtype", args.quant_dtype,
               "--cache-dtype", args.cache_dtype]
    command += ["--quick"] * args.quick + ["--no-quant-vision"] * args.no_quant_vision
    command += ["--model", args.model] if args.model else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        error = (result.stderr.strip().splitlines() or ["no output"])[-1]
        if result.returncode < 0 or result.returncode == 137:
            error = f"killed (signal {-result.returncode if result.returncode < 0 else 9}; out of memory?)"
        return dict(dtype=worker.removeprefix("hf-"), error=error)
    return json.loads(lines[-1])


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['dtype']:<9} failed: {r['error']}"
    fraction = f"{r['roofline_fraction'] * 100:5.0f}%" if "roofline_fraction" in r else "     -"
    return (f"{r['dtype']:<9} {r['t_ve_s']:7.2f} {r['prompt_tok_s']:8.1f} {r['gen_tok_s']:8.2f} {r['total_s']:8.1f} "
            f"{r['weight_bytes'] / GB:8.2f} {r['peak_rss_bytes'] / GB:8.2f} "
            f"{r.get('bytes_per_token', 0) / GB:7.2f} {r['bandwidth_bytes_s'] / GB:6.1f} "
            f"{r.get('roofline_tok_s', float('nan')):8.2f} {fraction} {r.get('cache_dtype', '-'):>8}")


HEADER = (f"{'dtype':<9} {'T_VE s':>7} {'prompt':>8} {'gen':>8} {'total s':>8} {'weights':>8} {'peak RSS':>8} "
          f"{'GB/tok':>7} {'GB/s':>6} {'roofline':>8} {'frac':>6} {'KV cache':>8}\n"
          f"{'':<9} {'':>7} {'tok/s':>8} {'tok/s':>8} {'':>8} {'GB':>8} {'GB':>8} {'':>7} {'':>6} {'tok/s':>8} {'':>6}")


def read_llama_cpp(path) -> dict:
    """tools/llama_cpp_reference.py's JSON -> {(format, test, depth): best tok/s}; else a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        figures = {}
        for r in rows:  # the better of flash attention on and off
            key = (r["format"], r["test"], int(r["depth"]))
            figures[key] = max(figures.get(key, 0.0), float(r["tok_s"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        raise BenchError(f"--llama-cpp {path}: not a tools/llama_cpp_reference.py result ({error})") from None
    if not any(key[:2] == ("Q4_0", f"tg{NEW_TOKENS}") for key in figures):
        raise BenchError(f"--llama-cpp {path}: no Q4_0 decode (tg{NEW_TOKENS}) in it")
    return figures


def llama_cpp_decode(llama_cpp: dict, depth: int, kind: str = "Q4_0") -> float | None:
    """llama.cpp's decode here in format `kind` (Q4_0, Q8_0, BF16), at the measured depth nearest to ours (a query
    decodes after 770 positions); None if that format was not measured."""
    depths = [key[2] for key in llama_cpp if key[:2] == (kind, f"tg{NEW_TOKENS}")]
    if not depths:
        return None
    return llama_cpp[(kind, f"tg{NEW_TOKENS}", min(depths, key=lambda d: abs(d - depth)))]


def llama_cpp_query(llama_cpp: dict, r: dict) -> float | None:
    """The seconds llama.cpp's Q4_0 would take for this row's query: its decoder (its prefill and decode speeds
    here) after our tower's T_VE, as the paper's T_total adds them; None without its prefill figure."""
    prefill = [tok_s for (kind, test, _), tok_s in llama_cpp.items() if kind == "Q4_0" and test.startswith("pp")]
    if not prefill:
        return None
    return (r["t_ve_s"] + r["prompt_tokens"] / max(prefill)
            + r["generated_tokens"] / llama_cpp_decode(llama_cpp, r["prompt_tokens"]))


def print_targets(results: dict, theirs: dict, quick: bool, llama_cpp: dict | None = None):
    """nanoImp's speed targets, checked on this run's figures (full-size runs only: --quick is a smoke test).
    With llama_cpp (measured here by tools/llama_cpp_reference.py) the int4 decode compares with it on this CPU."""
    def ok(condition):
        return "ok  " if condition else "MISS"
    lines = []
    int4, bf16, fp32 = results.get("int4"), results.get("bfloat16"), results.get("float32")
    int4s = [r for r in (int4, results.get("int4+a8")) if r]  # with int8 activations: a row of its own
    for r in int4s:
        name = r["dtype"]
        lines.append(f"{ok(r['total_s'] <= 29.5)} {name} query {r['total_s']:.1f} s (target <= 29.5 s)")
        if llama_cpp:
            here = llama_cpp_decode(llama_cpp, r["prompt_tokens"])
            lines.append(f"{ok(r['gen_tok_s'] >= here)} {name} decode {r['gen_tok_s']:.2f} tok/s = "
                         f"{r['gen_tok_s'] / here:.2f} x llama.cpp Q4_0 on this machine ({here:.2f} tok/s; "
                         f"target >= 1.0 x)")
            query = llama_cpp_query(llama_cpp, r)
            if query:
                lines.append(f"{ok(r['total_s'] < query)} {name} query {r['total_s']:.1f} s vs {query:.1f} s for "
                             f"llama.cpp Q4_0's decoder after our T_VE (target: below)")
        low = 0.6 * LLAMA_CPP_Q4_0_GEN[0]
        lines.append(f"{ok(r['gen_tok_s'] >= low)} {name} decode {r['gen_tok_s']:.2f} tok/s (target >= 0.6 x "
                     f"llama.cpp Q4_0 = {low:.1f}-{0.6 * LLAMA_CPP_Q4_0_GEN[1]:.1f} tok/s on the reference machine)")
        lines.append(f"{ok(r['peak_rss_bytes'] <= 3e9)} {name} peak RSS {r['peak_rss_bytes'] / GB:.2f} GB "
                     f"(target <= 3 GB)")
    for r, kind, share in ((bf16, "BF16", 0.9), (results.get("int8"), "Q8_0", 1.0)):
        here = llama_cpp and r and llama_cpp_decode(llama_cpp, r["prompt_tokens"], kind)
        if here:
            lines.append(f"{ok(r['gen_tok_s'] >= share * here)} {r['dtype']} decode {r['gen_tok_s']:.2f} tok/s = "
                         f"{r['gen_tok_s'] / here:.2f} x llama.cpp {kind} on this machine ({here:.2f} tok/s; "
                         f"target >= {share:.1f} x)")
    for r in int4s + [bf16]:
        if r:
            lines.append(f"{ok(r['prompt_tok_s'] >= 50)} {r['dtype']} prefill {r['prompt_tok_s']:.1f} tok/s "
                         f"(target >= 50)")
    for r in results.values():
        lines.append(f"{ok(r['roofline_fraction'] >= 0.55)} {r['dtype']} decode at "
                     f"{r['roofline_fraction'] * 100:.0f}% of its roofline (target >= 55%)")
    for r in results.values():
        if r["dtype"] in FLOAT_DTYPES or r is int4:
            lines.append(f"{ok(r['t_ve_s'] <= 2.4)} {r['dtype']} vision {r['t_ve_s']:.2f} s per image (target <= 2.4 s)")
            break
    for r in [r for r in int4s if r is not int4]:  # int4+a8: its vision tower runs another path
        lines.append(f"{ok(r['t_ve_s'] <= 2.4)} {r['dtype']} vision {r['t_ve_s']:.2f} s per image (target <= 2.4 s)")
    for r in (fp32, bf16):
        if r and r["dtype"] in theirs:
            t = theirs[r["dtype"]]
            lines.append(f"{ok(r['total_s'] < t['total_s'])} {r['dtype']} query {r['total_s']:.1f} s vs transformers "
                         f"{t['total_s']:.1f} s (target: faster)")
    print("\ntargets" + (" (--quick: a small model, only a smoke check)" if quick else "") + ":")
    for line in lines:
        print("  " + line)


def run(argv) -> int:
    args = parse_arguments(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    torch.set_num_threads(args.threads)
    llama_cpp = read_llama_cpp(args.llama_cpp) if args.llama_cpp else None  # checked before the long part
    precisions = [p for p in PRECISIONS + A8_PRECISIONS if p in args.dtypes]
    notes = []
    config = make_config(args) if not args.model else None
    what = f"weights from {args.model}" if args.model else \
        f"{'--quick config' if args.quick else f'{members_named(args.family)} shapes, {args.image_size} px'}, random weights"
    print(f"nanoImp bench: {what}, {args.threads} threads, torch {torch.__version__}, "
          f"best_cpu_dtype {str(kernels.best_cpu_dtype()).replace('torch.', '')}", flush=True)
    machine = dict(cpu=cpu_name(), threads=args.threads, torch=torch.__version__,
                   best_cpu_dtype=str(kernels.best_cpu_dtype()).replace("torch.", ""),
                   bandwidth_bytes_s=memory_bandwidth(0.125 if args.quick else 1.0))
    print(f"memory read bandwidth (best of torch.sum / mv / amax, {args.threads} threads): "
          f"{machine['bandwidth_bytes_s'] / GB:.1f} GB/s (each row re-measures it before and after its query and uses "
          f"the better)", flush=True)
    if config is not None:
        print(f"query: 1 image ({config.vision.num_patches} tokens) + {TEXT_TOKENS} text tokens, "
              f"{args.new_tokens} new tokens", flush=True)
    results, theirs, members = {}, {}, {}
    for family in args.family:
        if args.family != ["3b"]:
            shapes = member_config(family, args.quick, args.image_size) if family != "3b" else None
            print(f"\n{MEMBERS[family]}" + (f": {shapes.text.num_hidden_layers} layers of {shapes.text.hidden_size}"
                                            if shapes else ""), end="", flush=True)
        print("\n" + HEADER, flush=True)
        members[family] = {}
        for precision in precisions:
            members[family][precision] = dict(run_in_subprocess(args, precision, family), family=family)
            print(format_row(members[family][precision]), flush=True)
    results = members.get("3b") or members[args.family[0]]
    if args.compare:
        for precision in [p for p in precisions if p in FLOAT_DTYPES]:
            theirs[precision] = run_in_subprocess(args, f"hf-{precision}")
            if "error" in theirs[precision] and "needs transformers" in theirs[precision]["error"]:
                notes.append(theirs.pop(precision)["error"])
                break
        if theirs:
            print("\ntransformers, same weights and query:")
            print(HEADER)
            for r in theirs.values():
                print(format_row(r))
            print("\nours / theirs (> 1 is better for us, speeds and 1/times):")
            print(f"{'dtype':<9} {'T_VE':>7} {'prompt':>8} {'gen':>8} {'total':>8} {'peak RSS':>9}")
            for precision, t in theirs.items():
                o = results.get(precision, {})
                if "error" in t or "error" in o:
                    continue
                print(f"{precision:<9} {t['t_ve_s'] / o['t_ve_s']:7.2f} {o['prompt_tok_s'] / t['prompt_tok_s']:8.2f} "
                      f"{o['gen_tok_s'] / t['gen_tok_s']:8.2f} {t['total_s'] / o['total_s']:8.2f} "
                      f"{t['peak_rss_bytes'] / o['peak_rss_bytes']:9.2f}")
    good = {p: r for p, r in results.items() if "error" not in r}
    good_theirs = {p: r for p, r in theirs.items() if "error" not in r}
    if good and args.family == ["3b"]:  # the targets are Imp-3B's
        print_targets(good, good_theirs, args.quick, llama_cpp)
    for note in notes:
        print(f"note: {note}")
    if args.json:
        document = dict(machine=machine, config="quick" if args.quick else (args.model or f"imp-{'+'.join(args.family)}-{args.image_size}"),
                        notes=notes, results=[r for rows in members.values() for r in rows.values()],
                        transformers=list(theirs.values()),
                        llama_cpp=[dict(format=k[0], test=k[1], depth=k[2], tok_s=v) for k, v in (llama_cpp or {}).items()])
        imp.write_json(args.json, document)
        print(f"wrote {args.json}")
    failed = [p for rows in list(members.values()) + [theirs] for p, r in rows.items() if "error" in r]
    return 1 if failed else 0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except BenchError as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # --json on a full disk, at the end
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"bench.py: error: {error.filename or 'disk'}: {error.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
