#!/usr/bin/env python3
"""
infer.py: ask Imp about an image from the command line. The answer streams to stdout token by token; notes,
--stats and --explain go to stderr, so `> answer.txt` keeps only the answer.

    python infer.py photo.jpg "What is in this picture?"
    python infer.py --text "Write a haiku about cats."           # no image: Imp is Phi-2 with a chat template
    python infer.py --chat photo.jpg                             # multi-turn; /image PATH, /reset, /quit
    python infer.py --batch questions.jsonl --out answers.jsonl  # resumable; rerun after a crash to finish
    python infer.py --attention-map where.png photo.jpg "What is it?"  # + which patches the answer attended to

Which model: --model DIR, else $IMP_MODEL, else the tiny demo model in checkpoints/demo. DIR is an official Imp
folder (MILVLG/imp-v1-3b, either layout) or one written by train.py or quant.py. Nothing is ever downloaded here.

The road a question takes (--explain prints it with this run's real shapes and timings):
    image -> upright RGB -> resized to 384x384 -> 27x27 = 729 patches -> 26 SigLIP layers -> 729 x 1152 features
          -> connector -> 729 x 2560 "tokens" spliced where <image> sits in the prompt -> Phi-2 prefill -> decode
The four latency figures of the paper's Table 4 (--stats): T_VE, the visual encoding time; S_prompt, prompt tokens
(text plus image embeddings) per second of prefill; S_gen, generated tokens per second; T_total, the whole
question. Model loading is timed separately, as in the paper.
"""

import argparse
import errno
import json
import math
import os
import resource
import sys
import time

import torch

import imp
import kernels
import quant
import visualize

EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL = os.path.join(HERE, "checkpoints", "demo")
GET_WEIGHTS = ("to get Imp-3B (about 6 GB), run `huggingface-cli download MILVLG/imp-v1-3b --local-dir imp-v1-3b` "
               "(or `git lfs clone https://huggingface.co/MILVLG/imp-v1-3b`), then pass --model imp-v1-3b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings a --batch line may override for itself; every other extra key (e.g. "category") is ignored.
LINE_SETTINGS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}

EXAMPLES = """examples:
  python infer.py photo.jpg "What is in this picture?"
  python infer.py --model imp-v1-3b --stats photo.jpg "Describe the image."
  python infer.py --explain examples/three_squares.png "How many shapes are there?"
  python infer.py --attention-map where.png examples/one_circle.png "What color is the circle?"
  python infer.py --text "What is the capital of France?"
  python infer.py --chat photo.jpg                     (then type; /image PATH, /reset, /quit)
  printf 'What color?\\nAnd the shape?\\n' | python infer.py --chat photo.jpg
  python infer.py --batch questions.jsonl --out answers.jsonl --image-folder images/
  python infer.py --quant int4 --int8-activations --stats photo.jpg "Describe it."   (faster prefill)
  python infer.py --quant int4 --temperature 0.7 --top-p 0.9 --seed 1 photo.jpg "Tell a story about it."

--batch input, one JSON object per line:
  {"question_id": 1, "image": "cat.jpg", "text": "What animal?", "max_new_tokens": 32}
output, appended one line per answer (a rerun skips ids already there):
  {"question_id": 1, "text": "A cat.", "model": "imp-v1-3b", "prompt_tokens": 781, ...}

exit codes: 0 ok, 1 a --batch finished but some questions failed (see their "error"), 2 bad usage or input
(one line on stderr), 130 interrupted (Ctrl-C; what was generated so far stays printed)."""


class InputError(Exception):
    """Anything the user can fix: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we keep to the one-line rule
        raise InputError(f"{message} (see --help)")


def parse_arguments(argv):
    parser = Parser(prog="infer.py", description="Ask Imp (arXiv 2405.12107) about an image.", epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="IMAGE QUESTION", help="an image file and a question about it")
    parser.add_argument("--text", metavar="QUESTION", help="a question without an image")
    parser.add_argument("--model", metavar="DIR", help="Imp folder (default: $IMP_MODEL, else checkpoints/demo)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: bfloat16 if the CPU has native "
                        "bfloat16, else float32)")
    parser.add_argument("--quant", choices=("int8", "int4"), help="quantize the weights while loading (quant.py)")
    parser.add_argument("--int8-activations", action="store_true", help="with a quantized model (--quant or a "
                        "quantized folder): round activations to int8 for integer products, numbers move by ~1%% "
                        "(kernels.set_int8_activations): decode through kernels.c on x86 CPUs with AVX2 where a C "
                        "compiler exists (which decodes with 16-bit activations without it: a few %% faster); "
                        "prefill and the vision tower on CPUs with int8 "
                        "dot-product instructions, VNNI or AMX (~2-3x); where neither applies, left off with a note")
    parser.add_argument("--kv-cache", choices=("auto", *DTYPES), default="auto", help="dtype of the attention "
                        "cache (default auto: float16 for a quantized model computing in float32, which halves the "
                        "cache's memory; otherwise the model's dtype), e.g. --quant int4 --kv-cache float32: a faster decode "
                        "attention for twice the cache's memory (--stats shows both)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", default=256, help="answer length limit (default 256)")
    parser.add_argument("--temperature", type=float, metavar="T", default=0.0, help="0 = greedy, the official setting (default)")
    parser.add_argument("--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling, with --temperature > 0")
    parser.add_argument("--top-k", type=int, metavar="K", default=0, help="keep the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, metavar="N", help="seed for sampling, for repeatable answers")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--image-size", type=int, metavar="PIXELS", help="must equal the model's trained size (checked)")
    parser.add_argument("--aspect", choices=("square", "pad"), help="squash to a square, or pad to one first "
                        "(default: the model's config)")
    parser.add_argument("--chat", action="store_true", help="multi-turn conversation, from a terminal or a pipe")
    parser.add_argument("--batch", metavar="JSONL", help="answer every question of a JSONL file")
    parser.add_argument("--out", metavar="JSONL", help="where --batch appends its answers")
    parser.add_argument("--image-folder", metavar="DIR", help="--batch images live here (default: the JSONL's "
                        "folder); paths that lead outside it are refused")
    parser.add_argument("--stats", action="store_true", help="print the paper's Table 4 latency figures")
    parser.add_argument("--explain", action="store_true", help="print the question's way through the model")
    parser.add_argument("--attention-map", metavar="PNG", help="also save the image with a heat map of how much "
                        "the answer attended to each image patch (mean over all layers, heads and answer tokens), "
                        "e.g. --attention-map where.png photo.jpg \"What is this?\"")
    args = parser.parse_args(argv)

    # Which mode, and are its inputs all there?
    modes = [name for name, given in (("--chat", args.chat), ("--batch", args.batch), ("--text", args.text is not None))
             if given]
    if len(modes) > 1:
        raise InputError(f"{' and '.join(modes)} cannot be combined")
    if args.batch and not args.out:
        raise InputError("--batch needs --out ANSWERS.jsonl")
    if args.out and not args.batch:
        raise InputError("--out only goes with --batch")
    if args.chat and len(args.inputs) > 1:
        raise InputError("--chat takes at most one IMAGE; type the questions after it starts")
    if (args.batch or args.text is not None) and args.inputs:
        raise InputError(f"{modes[0]} takes no IMAGE or QUESTION arguments (got {' '.join(args.inputs)!r})")
    if not modes and len(args.inputs) != 2:
        raise InputError("give an IMAGE and a QUESTION (in quotes), or --text QUESTION for a question without an "
                         "image" if args.inputs else "nothing to ask: give an IMAGE and a QUESTION")
    if (args.stats or args.explain) and (args.chat or args.batch):
        raise InputError("--stats and --explain are for one question (--batch records timings in each answer)")
    if args.attention_map is not None:
        if args.text is not None:
            raise InputError("--attention-map needs an image: it shows how the answer attends to the image's "
                             "patches, and a --text question has none")
        if args.chat or args.batch:
            raise InputError("--attention-map is for one IMAGE and QUESTION, not --chat or --batch")
        visualize.check_output_path(args.attention_map)
    check_settings(dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed), "")
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be at least 1")
    return args


def check_settings(settings: dict, where: str):
    """Generation settings, from the command line or a --batch line; bad ones are input errors."""
    problems = []
    settings = {name: value for name, value in settings.items() if value is not None}
    for name, value in list(settings.items()):
        if not math.isfinite(value):
            problems.append(f"{name} must be a finite number")
        elif name == "seed" and not 0 <= value < 2**64:  # what torch.Generator.manual_seed takes
            problems.append("seed must be in 0 .. 2**64 - 1")
        elif name != "seed" and LINE_SETTINGS.get(name) is int and abs(value) >= 2**63:
            problems.append(f"{name} is too large")
        else:
            continue
        del settings[name]
    if "max_new_tokens" in settings and settings["max_new_tokens"] < 1:
        problems.append("max_new_tokens must be at least 1")
    if "temperature" in settings and not settings["temperature"] >= 0:  # `not >=` also catches NaN
        problems.append("temperature must be 0 (greedy) or more")
    if "top_p" in settings and not 0 < settings["top_p"] <= 1:
        problems.append("top_p must be in (0, 1]")
    if "top_k" in settings and settings["top_k"] < 0:
        problems.append("top_k must be 0 (all) or more")
    if problems:
        raise InputError(where + "; ".join(problems))


def generation_settings(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, cache_dtype=getattr(args, "cache_dtype", None))


def kv_cache_dtype(choice: str, model) -> torch.dtype | None:
    """--kv-cache: a dtype, or auto (quant.default_cache_dtype: float16 for a quantized model computing in float32).
    None means the model's own dtype."""
    return DTYPES[choice] if choice != "auto" else quant.default_cache_dtype(model)


def check_text(text: str, what: str):
    """Text that cannot be encoded as UTF-8 (lone surrogates: the bytes of a non-UTF-8 argument or file line, or a
    \\udcff escape in JSON) is refused here, not deep inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid UTF-8 text") from None


def read_question(text: str) -> str:
    check_text(text, "the question")
    if not text.strip():
        raise InputError("the question is empty")
    return text.strip()


def read_image(path: str):
    """imp.load_image (upright, first frame, refuses decompression bombs); its remarks become notes on stderr."""
    notes = []
    image = imp.load_image(path, notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return image


# ----------------------------------------------------------------------------------------------------------------
# The model: which folder, loading, optional quantization.


def resolve_model_path(args) -> str:
    if args.model:
        return args.model
    if os.environ.get("IMP_MODEL"):
        return os.environ["IMP_MODEL"]
    if os.path.isdir(DEMO_MODEL):
        print(f"note: using the tiny demo model in checkpoints/demo (it knows only toy shapes); {GET_WEIGHTS}",
              file=sys.stderr)
        return DEMO_MODEL
    raise InputError(f"no model: pass --model DIR or set IMP_MODEL (checkpoints/demo does not exist); {GET_WEIGHTS}")


def load_model(args, path):
    """-> (model, seconds). A folder that is missing, incomplete or not an Imp model is an input error. The fast
    layer (kernels.py) is switched on: packed int8/int4 kernels, bfloat16 rows, in-place activations."""
    started = time.perf_counter()
    dtype = DTYPES[args.dtype] if args.dtype else kernels.best_cpu_dtype()
    try:
        model = quant.load(path, dtype=dtype)  # a float folder, or one written by quant.py
    except (KeyError, TypeError, AttributeError) as error:  # config.json is JSON but lacks what an Imp config has
        raise InputError(f"{path}/config.json is not an Imp config (missing or malformed: {error})") from None
    quantized = any(isinstance(m, quant.QuantLinear) for m in model.modules())
    if args.quant:
        if quantized:
            bits = next(m.bits for m in model.modules() if isinstance(m, quant.QuantLinear))
            raise InputError(f"{path} is already quantized (int{bits}): drop --quant")
        quant.quantize_model(model, bits=int(args.quant[3:]))  # in place: Linear -> QuantLinear
    elif args.int8_activations and not quantized:
        raise InputError("--int8-activations needs a quantized model: add --quant int8 or int4, or load a "
                         "folder written by quant.py")
    fast = kernels.enable(model, int8_activations=args.int8_activations)
    said = fast[fast.index("int8 activations"):] if args.int8_activations else ""  # enable() says it last
    if said and not said.startswith("int8 activations in"):
        print(f"note: --int8-activations: {said}; the float path is used", file=sys.stderr)
    elif "in float" in said:  # decode only (kernels.c), on a CPU without int8 dot-product instructions
        print(f"note: --int8-activations: {said}", file=sys.stderr)
    trained_size = model.config.vision.image_size
    if args.image_size is not None and args.image_size != trained_size:
        # SigLIP learns one position embedding per patch of a trained grid (27 x 27 at 384 px); another size would
        # need interpolated position embeddings, which Imp never trained with.
        raise InputError(f"--image-size {args.image_size}: this model was trained at {trained_size} px and its "
                         f"position embeddings fit only that size")
    args.cache_dtype = kv_cache_dtype(args.kv_cache, model)
    return model, time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------------------
# One question: stream the answer, then optionally the Table 4 figures.


def write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()  # token by token, even into a pipe


def generate_with_stats(model, input_ids, pixel_values, stats: dict, **settings):
    """model.generate, timed by phase into `stats`, the figures of the paper's Table 4: vision_seconds (T_VE:
    the tower, the connector, the splice), prompt_tokens and prompt_seconds (the prefill, until the first new
    token), generated_tokens and generate_seconds (from the first new token to the last), and the token_ids."""
    clock = time.perf_counter
    started = clock()
    with torch.inference_mode():
        embeddings = model.embed(input_ids, pixel_values)  # (1, T', C)
    prefill_started = first = clock()
    stats.update(vision_seconds=prefill_started - started, prompt_tokens=embeddings.shape[1], prompt_seconds=0.0,
                 generated_tokens=0, generate_seconds=0.0, token_ids=[])
    for token in model.generate(inputs_embeds=embeddings, **settings):
        if not stats["token_ids"]:
            first = clock()
            stats["prompt_seconds"] = first - prefill_started
        stats["token_ids"].append(token)
        stats["generated_tokens"] += 1
        stats["generate_seconds"] = clock() - first  # so far: a caller may stop early
        yield token
    if stats["token_ids"]:
        stats["generate_seconds"] = clock() - first
    else:
        stats["prompt_seconds"] = clock() - prefill_started


def ask(model, image, question, args, history=(), stats=None) -> str:
    """Stream one answer to stdout and return it; its timings go into `stats` (generate_with_stats)."""
    input_ids, pixel_values = imp.prepare_inputs(model, image, question, history, aspect=args.aspect)
    tokens = generate_with_stats(model, input_ids, pixel_values, {} if stats is None else stats,
                                 **generation_settings(args))
    pieces = []
    for piece in imp.text_pieces(model.tokenizer, tokens):
        write(piece)
        pieces.append(piece)
    write("\n")
    return "".join(pieces).strip()


def print_stats(stats: dict, total_seconds: float, load_seconds: float, model, args):
    speed = lambda tokens, seconds: f"{tokens / seconds:8.1f} tokens/s" if seconds > 0 else "       - tokens/s"
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    lines = [
        f"--- latency (the figures of the paper's Table 4, for this run; {dtype}"
        f"{', ' + args.quant if args.quant else ''}{', int8 activations' if args.int8_activations else ''}, "
        f"{torch.get_num_threads()} threads) ---",
        f"model load          {load_seconds:8.2f} s     (not part of T_total, as in the paper)",
        f"T_VE                {stats['vision_seconds']:8.2f} s     visual encoding: SigLIP + connector",
        f"prompt tokens       {stats['prompt_tokens']:8d}       text plus image embeddings",
        f"S_prompt            {speed(stats['prompt_tokens'], stats['prompt_seconds'])}   "
        f"prefill in {stats['prompt_seconds']:.2f} s",
        f"generated tokens    {stats['generated_tokens']:8d}",
        f"S_gen               {speed(stats['generated_tokens'], stats['generate_seconds'])}   "
        f"decode in {stats['generate_seconds']:.2f} s",
        f"T_total             {total_seconds:8.2f} s     preprocessing + T_VE + prefill + decode",
        f"KV cache            {kv_cache_line(model, args, stats)}",
        f"peak RSS            {peak_kib / 1024**2:8.2f} GiB",
    ]
    print("\n".join(lines), file=sys.stderr)


def kv_cache_line(model, args, stats) -> str:
    """The cache's dtype and size at the end of this answer, and how decode attention reads it: memory vs speed."""
    text = model.config.text
    dtype = args.cache_dtype or next(p.dtype for p in model.llm.parameters() if p.is_floating_point())
    positions = stats["prompt_tokens"] + stats["generated_tokens"]
    size = 2 * text.num_hidden_layers * positions * text.hidden_size * dtype.itemsize
    attention = model.llm.layers[0].self_attn
    fast = isinstance(attention, (kernels.DecodeAttention, kernels.LlamaDecodeAttention))
    compiled = "kernels.c, reading the cache as it is" if kernels.compiled_kernels() else "written out in torch"
    path = (f"products in float32 ({compiled})" if fast and dtype in (torch.float16, torch.bfloat16)
            else f"the fused kernel in {str(dtype)[6:]}")
    return f"{str(dtype)[6:]}, {size / 1e9:.2f} GB for {positions} positions; decode attention: {path}"


def run_single(model, image, question, args, load_seconds):
    if args.explain:
        explain_before(model, image, question, args)
    started, stats = time.perf_counter(), {}  # after --explain's own walk through the tower: T_total is one question
    ask(model, image, question, args, stats=stats)
    total_seconds = time.perf_counter() - started
    if args.explain:
        explain_after(model, stats, args)
    if args.stats:
        print_stats(stats, total_seconds, load_seconds, model, args)
    if args.attention_map:
        save_attention_map(model, image, question, stats["token_ids"], args)
    return EXIT_OK


def save_attention_map(model, image, question, answer_ids, args):
    """--attention-map: one more forward pass over the prompt and the answer just given, with the attention
    probabilities kept (visualize.answer_attention), drawn over the image at its own size."""
    input_ids, pixel_values = imp.prepare_inputs(model, image, question, aspect=args.aspect)
    grid, share = visualize.answer_attention(model, input_ids, pixel_values, answer_ids)
    aspect = args.aspect or model.config.image_aspect_ratio
    try:
        visualize.save_picture(visualize.heat_map_picture(image, grid, aspect), args.attention_map)
    except OSError as error:  # the folder was checked before loading; the disk can still be full or read-only
        raise InputError(f"{args.attention_map}: cannot write ({error.strerror or error})") from None
    row, column = divmod(int(grid.argmax()), grid.shape[1])
    text = model.config.text
    rows = f"the answer's {len(answer_ids)} token(s)" if answer_ids else "the empty answer's one position"
    print(f"attention map: {args.attention_map} ({grid.shape[0]}x{grid.shape[1]} patches; {rows} gave {share:.1%} "
          f"of their attention to the image, mean over {text.num_hidden_layers} layers x "
          f"{text.num_attention_heads} heads; brightest patch: row {row + 1}, column {column + 1})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# --explain: the same journey as Imp.generate, one visible step at a time, with this run's shapes and timings.


def explain_before(model, image, question, args):
    say = lambda step, text: print(f"[{step}] {text}", file=sys.stderr)
    config, timer = model.config, time.perf_counter
    prompt = imp.build_prompt(question, with_image=image is not None, template=config.template)  # the official one
    prompt_length = len(imp.encode_prompt(model.tokenizer, prompt, config, num_images=int(image is not None)))
    if image is not None:
        size, aspect = config.vision.image_size, args.aspect or config.image_aspect_ratio
        say("image    ", f"{image.size[0]}x{image.size[1]} {image.mode}, as displayed (EXIF rotation applied, if any) -> RGB")
        started = timer()
        pixels = imp.preprocess_image(image, size, aspect)[None]  # (1, 3, S, S)
        say("resize   ", f"{'pad to a square, then ' if aspect == 'pad' else ''}bicubic to {size}x{size}, scaled to "
                        f"[-1, 1] -> pixel tensor {tuple(pixels.shape)}  {milliseconds(timer() - started)}")
        vision = model.vision
        with torch.inference_mode():  # the steps of SigLIP.forward and Imp.encode_images, spelled out
            started = timer()
            grid = vision.patch_embedding(pixels.to(vision.patch_embedding.weight.dtype))  # (1, D, S/14, S/14)
            patches = grid.flatten(2).transpose(1, 2) + vision.position_embedding.weight  # (1, N, D)
            patch = config.vision.patch_size
            say("patches  ", f"{patch}x{patch} conv with stride {patch}: a {grid.shape[2]}x{grid.shape[3]} grid = "
                            f"{patches.shape[1]} patches of {patches.shape[2]} dims, plus a learned position "
                            f"embedding each -> {tuple(patches.shape)}  {milliseconds(timer() - started)}")
            started, x = timer(), patches
            for layer in vision.layers:
                x = layer(x)
            say("ViT      ", f"{len(vision.layers)} of SigLIP's {config.vision.num_hidden_layers} layers (Imp reads "
                            f"the penultimate layer's output), each {tuple(x.shape)} -> {tuple(x.shape)}  "
                            f"{milliseconds(timer() - started)}")
            say("features ", f"{tuple(x.shape)}: one {x.shape[2]}-d vector per patch, no pooling")
            started = timer()
            tokens = model.connector(x)
            say("connector", f"Linear {x.shape[2]}->{tokens.shape[2]}, GELU, Linear {tokens.shape[2]}->"
                            f"{tokens.shape[2]}: {tuple(x.shape)} -> {tuple(tokens.shape)}, the image now looks "
                            f"like {tokens.shape[1]} word embeddings  {milliseconds(timer() - started)}")
        say("splice   ", f"prompt template {prompt_length} tokens with one <image> -> {prompt_length} - 1 + "
                        f"{tokens.shape[1]} = {prompt_length - 1 + tokens.shape[1]} positions of "
                        f"{config.text.hidden_size} dims")
    else:
        say("prompt   ", f"no image: the template gives {prompt_length} tokens of {config.text.hidden_size} dims")
    print("[answer   ] (Imp.generate runs the whole pipeline again, timed for real:)", file=sys.stderr)


def explain_after(model, stats, args):
    text = model.config.text
    say = lambda step, line: print(f"[{step}] {line}", file=sys.stderr)
    say("decoder  ", f"{imp.DECODER_NAMES[model.config.template]}, {text.num_hidden_layers} layers of {text.hidden_size} dims: prefill of "
                    f"{stats['prompt_tokens']} positions at once -> KV cache + logits (1, 1, {text.vocab_size}) "
                    f"in {stats['prompt_seconds']:.2f} s; the image took {stats['vision_seconds']:.2f} s again")
    stop = ("max-new-tokens reached" if stats["generated_tokens"] >= args.max_new_tokens else
            "stopped at </s> (or the context end)")
    speed = stats["generated_tokens"] / stats["generate_seconds"] if stats["generate_seconds"] > 0 else 0.0
    say("tokens   ", f"{stats['generated_tokens']} tokens, one decoder pass each over the cache, "
                    f"{'greedy' if args.temperature == 0 else 'sampled'}, {speed:.1f} tokens/s; {stop}")


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ----------------------------------------------------------------------------------------------------------------
# --chat: the official multi-turn template; the image belongs to the first turn, as in Imp's training data.

CHAT_HELP = "commands: /image PATH (new image, new conversation), /image (no image), /reset, /quit"


def run_chat(model, image, args):
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 arrives with its bytes escaped, refused below
        sys.stdin.reconfigure(errors="surrogateescape")
    history = []  # [(question, answer)], rendered by imp.build_prompt in the model's template
    if interactive:
        print(f"chatting with {'an image' if image is not None else 'no image'}; {CHAT_HELP}", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input: Ctrl-D, or the end of a pipe
            return EXIT_OK
        line = line.strip()
        if not line:
            continue
        try:
            check_text(line, "that line")
        except InputError as error:  # one message, as a bad /image path: the chat goes on
            print(f"error: {error}; type it again", file=sys.stderr)
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                return EXIT_OK
            if command == "/reset":
                history = []
                print("(conversation reset)", file=sys.stderr)
            elif command == "/image":
                try:  # a bad path in a chat is one message, not the end of the chat
                    image = read_image(argument.strip()) if argument.strip() else None
                    history = []
                    print(f"({'new image' if image is not None else 'no image'}; conversation reset)",
                          file=sys.stderr)
                except imp.ImageError as error:
                    print(f"error: {error}", file=sys.stderr)
            else:
                print(f"unknown command {command}; {CHAT_HELP}", file=sys.stderr)
            continue
        while True:
            try:
                history.append((line, ask(model, image, line, args, history)))
                break
            except imp.PromptTooLongError as error:
                if not history:  # the question alone is too long: say so and wait for the next one
                    print(f"error: {error}", file=sys.stderr)
                    break
                history.pop(0)  # forget the oldest turn; the image stays, rendered with the new first turn
                print("(context full: dropped the oldest turn)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# --batch: JSONL in, JSONL out, append-only, resumable. One record per question id, written whole and fsynced.


def read_questions(path) -> list:
    """Every line checked before the model loads: a typo on line 900 should not cost a 30-minute run."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read ({error})") from None
    questions, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}: "
        try:
            question = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}not valid JSON ({error})") from None
        except RecursionError:
            raise InputError(f"{where}nested too deeply to be a question") from None
        if not isinstance(question, dict) or "question_id" not in question:
            raise InputError(f"{where}expected an object with question_id, text and (optionally) image")
        if not isinstance(question.get("text"), str) or not question["text"].strip():
            raise InputError(f"{where}missing or empty \"text\"")
        if "image" in question and (not isinstance(question["image"], str) or "\0" in question["image"]):
            raise InputError(f"{where}\"image\" must be a path (a string without NUL characters)")
        check_text(question["text"] + question.get("image", ""), f"{where}the question or its image path")
        for name, kind in LINE_SETTINGS.items():
            value = question.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or (kind is int and math.isfinite(value) and value != int(value))):
                raise InputError(f"{where}{name} must be a{'n integer' if kind is int else ' number'}")
        check_settings({name: question[name] for name in LINE_SETTINGS if question.get(name) is not None}, where)
        key = id_key(question["question_id"])
        if key in seen:
            raise InputError(f"{where}question_id {question['question_id']!r} appears twice")
        seen.add(key)
        questions.append(question)
    if not questions:
        raise InputError(f"{path}: no questions in it")
    return questions


def id_key(question_id) -> str:
    return json.dumps(question_id)  # 7 and "7" stay different ids, as they are different JSON values


def open_answers(path, questions_path):
    """Open the answers file for appending, and return it with the ids already answered. A run killed while
    writing can leave a last line without its newline: it is cut off here (that question is simply redone)."""
    if os.path.exists(path) and os.path.samefile(path, questions_path):  # also under another name or a link
        raise InputError(f"--out {path} is the --batch file itself: the answers go to another file")
    try:
        out = open(path, "a+b")  # binary: we truncate by byte offset
    except OSError as error:
        raise InputError(f"{path}: cannot open for writing ({error})") from None
    try:
        import fcntl  # two runs appending to one file would interleave their lines: refuse the second
        fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass  # not on Unix: no lock
    except OSError:
        raise InputError(f"{path}: another infer.py --batch is writing to it") from None
    out.seek(0)
    data = out.read()
    complete = data.rfind(b"\n") + 1  # bytes up to the end of the last whole line
    if complete < len(data):
        out.truncate(complete)
        print(f"note: {path}: removed an incomplete last line left by an interrupted run", file=sys.stderr)
    answered = set()
    for number, line in enumerate(data[:complete].splitlines(), 1):
        try:
            answered.add(id_key(json.loads(line)["question_id"]))
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path} line {number}: not an answer record; refusing to append to this file") from None
    return out, answered


def resolve_image(name: str, base: str) -> str:
    """A path from the data file, kept inside `base`: realpath follows .. and symbolic links before the check."""
    path = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([path, base]) != base:
        raise imp.ImageError(f"{name}: leads outside the image folder {base}; refused")
    return path


def answer_record(model, question, base, args, model_name) -> dict:
    record = dict(question_id=question["question_id"], model=model_name)
    if "image" in question:
        record["image"] = question["image"]
    settings = dict(generation_settings(args), **{name: kind(question[name]) for name, kind in LINE_SETTINGS.items()
                                                  if question.get(name) is not None})
    started = time.perf_counter()
    try:
        image = read_image(resolve_image(question["image"], base)) if "image" in question else None
        input_ids, pixel_values = imp.prepare_inputs(model, image, question["text"].strip(), aspect=args.aspect)
        stats = {}
        tokens = generate_with_stats(model, input_ids, pixel_values, stats, **settings)
        text = "".join(imp.text_pieces(model.tokenizer, tokens)).strip()
    except (imp.ImageError, imp.PromptTooLongError, imp.NotFiniteError) as error:
        print(f"error: question {question['question_id']!r}: {error}", file=sys.stderr)
        return dict(record, error=str(error))
    return dict(record, text=text, prompt_tokens=stats["prompt_tokens"],
                generated_tokens=stats["generated_tokens"], vision_seconds=round(stats["vision_seconds"], 4),
                prompt_seconds=round(stats["prompt_seconds"], 4), generate_seconds=round(stats["generate_seconds"], 4),
                total_seconds=round(time.perf_counter() - started, 4))


def run_batch(model, questions, out, answered, args, model_name):
    base = os.path.realpath(args.image_folder or os.path.dirname(os.path.abspath(args.batch)))
    todo = [q for q in questions if id_key(q["question_id"]) not in answered]
    total, done, failed = len(questions), len(questions) - len(todo), 0
    if done:
        print(f"{done} of {total} questions already answered in {args.out}: skipping them", file=sys.stderr)
    started = time.perf_counter()
    for count, question in enumerate(todo, 1):
        record = answer_record(model, question, base, args, model_name)
        failed += "error" in record
        # One whole line per write, flushed and fsynced: a crash or kill can only cut the line being written.
        out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        out.flush()
        os.fsync(out.fileno())
        rate = count / (time.perf_counter() - started)
        eta = (len(todo) - count) / rate
        progress = f"[{done + count}/{total}] {rate:.2f} questions/s, ETA {format_duration(eta)}"
        print(f"\r{progress}  " if sys.stderr.isatty() else progress, end="" if sys.stderr.isatty() else "\n",
              file=sys.stderr, flush=True)
    if todo and sys.stderr.isatty():
        print(file=sys.stderr)
    if failed:
        print(f"{failed} of {len(todo)} questions failed; their records in {args.out} say why", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


# ----------------------------------------------------------------------------------------------------------------
# main: check every input before loading the model (fail in a second, not after a minute of loading), then run.


def run(argv) -> int:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    image = question = out = None
    if args.batch:
        questions = read_questions(args.batch)
        if args.image_folder and not os.path.isdir(args.image_folder):
            raise InputError(f"--image-folder {args.image_folder}: no such folder")
        out, answered = open_answers(args.out, args.batch)
        if all(id_key(q["question_id"]) in answered for q in questions):
            print(f"all {len(questions)} questions already answered in {args.out}", file=sys.stderr)
            return EXIT_OK
    elif args.chat:
        image = read_image(args.inputs[0]) if args.inputs else None
    elif args.text is not None:
        question = read_question(args.text)
    else:
        question = read_question(args.inputs[1])  # the cheap check first
        image = read_image(args.inputs[0])
    try:
        path = resolve_model_path(args)
        model, load_seconds = load_model(args, path)
    except BaseException:
        if out is not None:
            out.close()
        raise
    if args.batch:
        with out:  # closing it also releases the lock
            model_name = os.path.basename(os.path.realpath(path))
            return run_batch(model, questions, out, answered, args, model_name)
    if args.chat:
        return run_chat(model, image, args)
    return run_single(model, image, question, args, load_seconds)


def main(argv=None) -> int:
    try:
        return run(argv)
    except (InputError, imp.ImageError, imp.CheckpointError, imp.PromptTooLongError, imp.NotFiniteError,
            visualize.PictureError) as error:
        print(f"infer.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C: what was streamed stays on screen; end its line and say why it stopped
        sys.stdout.write("\n")
        sys.stdout.flush()
        print("infer.py: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `python infer.py ... | head -c 100`: the reader left; nothing more to say
        sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush does not fail again
        return EXIT_OK
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"infer.py: error: {error.filename or 'disk'}: {error.strerror}; the answers written so far are kept",
              file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
