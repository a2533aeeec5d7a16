"""The llama.cpp reference, measured on *this* machine: a Phi-2-shaped decoder with random weights,
written as a GGUF file, quantized by llama.cpp's own llama-quantize, timed by its own llama-bench.

bench.py times nanoImp; its reference llama.cpp figures were taken on another machine (Zen 4, native
bfloat16, 30-50 GB/s). This script gives the same figures here, so "int4 decode >= 0.6x llama.cpp Q4_0" compares
two programs on one CPU. It is a tool, not part of nanoImp: it needs a llama.cpp build and the `gguf` package (a
reference, like transformers for bench.py --compare; nanoImp's own code never imports either).

    # once: build llama.cpp's two tools (any recent checkout; pip's llama-cpp-python sdist vendors one)
    cmake -S llama.cpp -B llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build llama.cpp/build -j --target llama-bench llama-quantize
    pip install gguf
    # then: write the f16 file (5.6 GB), quantize to Q4_0 and Q8_0, time prefill 770 and decode 64 at depth 0 and 770
    python tools/llama_cpp_reference.py --llama-cpp llama.cpp/build/bin --work /tmp/phi2-gguf --json llama.json
    python bench.py --dtypes int4 int4+a8 --llama-cpp llama.json

Each test runs with llama.cpp's flash attention on and off (its default, "auto", means on for a CPU): here, off
decodes after 770 positions 1.5x faster (5.9 against 3.8 tok/s), on is faster from an empty cache. bench.py
--llama-cpp takes the better of the two. Prints one line per test and writes one JSON object per (format, test,
depth, flash attention) to --json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)  # imp.py and bench.py live one folder up

import bench  # noqa: E402
import imp  # noqa: E402

PHI2 = imp.PhiConfig()  # Phi-2's shapes (microsoft/phi-2 config.json)
# bench.py's query: 729 image + 41 text tokens (the paper's), then 64 new tokens
PROMPT, NEW_TOKENS = imp.VisionConfig().num_patches + bench.TEXT_TOKENS, bench.NEW_TOKENS
END_OF_TEXT = 257  # our vocabulary's one special token, after the 256 byte tokens and one merged token


def byte_tokens():
    """GPT-2's byte -> printable character table: llama.cpp's BPE vocabulary expects its 256 byte tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, characters))]


def write_random_phi2_gguf(path, seed=0):
    """An f16 GGUF holding a random Phi-2 (std 0.02, LayerNorms 1 / 0), in the tensor names llama.cpp's phi2 loader
    reads. The vocabulary is 256 byte tokens, <|endoftext|> and padding: llama-bench feeds token ids, never text."""
    try:
        import gguf
    except ImportError:
        sys.exit("llama_cpp_reference.py: error: needs the gguf package (pip install gguf)")
    rng = np.random.default_rng(seed)
    d, ff, vocab = PHI2.hidden_size, PHI2.intermediate_size, PHI2.vocab_size
    writer = gguf.GGUFWriter(path, "phi2")
    writer.add_context_length(PHI2.max_position_embeddings)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(PHI2.num_hidden_layers)
    writer.add_head_count(PHI2.num_attention_heads)
    writer.add_head_count_kv(PHI2.num_attention_heads)
    writer.add_layer_norm_eps(PHI2.layer_norm_eps)
    writer.add_rope_dimension_count(PHI2.rotary_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = byte_tokens() + ["Ġt", "<|endoftext|>"]
    tokens += [f"[PAD{i}]" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.NORMAL] * vocab
    types[END_OF_TEXT] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(END_OF_TEXT)
    writer.add_eos_token_id(END_OF_TEXT)

    def weight(rows, cols):  # (out, in), as PyTorch stores a Linear's weight
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def vector(n, value=None):  # biases and norms stay float32, as llama.cpp's converter keeps them
        return np.full(n, value, np.float32) if value is not None else rng.standard_normal(n, dtype=np.float32) * 0.02

    writer.add_tensor("token_embd.weight", weight(vocab, d))
    for i in range(PHI2.num_hidden_layers):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", vector(d, 1.0))
        writer.add_tensor(f"{block}.attn_norm.bias", vector(d, 0.0))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", weight(d, d))
            writer.add_tensor(f"{block}.{name}.bias", vector(d))
        writer.add_tensor(f"{block}.ffn_up.weight", weight(ff, d))
        writer.add_tensor(f"{block}.ffn_up.bias", vector(ff))
        writer.add_tensor(f"{block}.ffn_down.weight", weight(d, ff))
        writer.add_tensor(f"{block}.ffn_down.bias", vector(d))
    writer.add_tensor("output_norm.weight", vector(d, 1.0))
    writer.add_tensor("output_norm.bias", vector(d, 0.0))
    writer.add_tensor("output.weight", weight(vocab, d))
    writer.add_tensor("output.bias", vector(vocab))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", required=True, metavar="DIR", help="folder with llama-bench and llama-quantize")
    parser.add_argument("--work", required=True, metavar="DIR", help="where the GGUF files go (~10 GB)")
    parser.add_argument("--formats", nargs="+", default=["Q4_0", "Q8_0"], help="llama-quantize types (default Q4_0 Q8_0)")
    parser.add_argument("--threads", type=int, default=2, help="threads (default 2, as bench.py)")
    parser.add_argument("--repetitions", type=int, default=3, help="llama-bench repetitions (default 3)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    tool = lambda name: os.path.join(args.llama_cpp, name)  # noqa: E731
    for name in ("llama-bench", "llama-quantize"):
        if not os.access(tool(name), os.X_OK):
            sys.exit(f"llama_cpp_reference.py: error: no {name} in {args.llama_cpp}")
    os.makedirs(args.work, exist_ok=True)
    f16 = os.path.join(args.work, "phi2-f16.gguf")
    if not os.path.exists(f16):
        started = time.time()
        write_random_phi2_gguf(f16 + ".tmp")
        os.replace(f16 + ".tmp", f16)
        print(f"wrote {f16} ({os.path.getsize(f16) / 1e9:.2f} GB) in {time.time() - started:.0f} s", flush=True)
    results = []
    for kind in args.formats:
        path = os.path.join(args.work, f"phi2-{kind.lower()}.gguf")
        if not os.path.exists(path):
            done = subprocess.run([tool("llama-quantize"), f16, path + ".tmp", kind, str(args.threads)],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"llama_cpp_reference.py: error: llama-quantize failed: {done.stderr.strip()[-500:]}")
            os.replace(path + ".tmp", path)
        print(f"{kind}: {os.path.getsize(path) / 1e9:.2f} GB", flush=True)
        # prefill 770 and decode 64 from an empty cache; then decode 64 after 770 positions (as in an Imp query)
        for depth in (0, PROMPT):
            output = subprocess.run([tool("llama-bench"), "-m", path, "-p", str(PROMPT) if depth == 0 else "0",
                                     "-n", str(NEW_TOKENS), "-d", str(depth), "-t", str(args.threads),
                                     "-fa", "on,off", "-r", str(args.repetitions), "-o", "json"],
                                    check=True, capture_output=True, text=True).stdout
            for row in json.loads(output):
                test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
                entry = dict(format=kind, test=test, depth=row.get("n_depth", depth), flash_attn=row["flash_attn"],
                             file_bytes=os.path.getsize(path), tok_s=row["avg_ts"], tok_s_stddev=row["stddev_ts"],
                             threads=args.threads)
                results.append(entry)
                print(f"  {test:>6} @ depth {entry['depth']:>3}, flash attention {'on ' if entry['flash_attn'] else 'off'}: "
                      f"{entry['tok_s']:.2f} +- {entry['tok_s_stddev']:.2f} tok/s", flush=True)
    if args.json:
        with open(args.json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
