#!/usr/bin/env python3
"""CPU batch-1 greedy decode of SmolLM2-135M with bf16 weights, measured in one run against
llama.cpp (llama-cpp-python on a bf16 GGUF of the same weights) and transformers (PyTorch CPU,
float32 and bfloat16). Prints decode tokens/s of each and ratios to djinn-dataplane.

Setup (once):
  scripts/fetch_smollm2.sh models/smollm2-bf16 bf16      # HF layout dir with bf16 weights
  pip install torch transformers llama-cpp-python gguf sentencepiece   # builds llama.cpp (slow)
  # The bf16 GGUF comes from llama.cpp's own converter, shipped in the llama-cpp-python sdist:
  pip download --no-deps --no-binary llama-cpp-python llama-cpp-python -d models/cache
  tar xzf models/cache/llama_cpp_python-*.tar.gz -C models/cache
Usage:
  scripts/bench_cpu_vs_llamacpp.py [--model-dir models/smollm2-bf16] [--tokens 128] [--threads 2]
      [--bin target/release/djinn-dataplane] [--llama-src DIR_WITH_convert_hf_to_gguf.py]

Decode rate = (tokens - 1) / (time of last token - time of first token), prefill excluded, the
same prompt ids for every engine, EOS ignored so every engine decodes the same count. Engines
run in interleaved rounds (`--repeats`); each reports its best round and the load average then.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PROMPT = "Once upon a time, in a small village by the sea,"


def ours(args, ids):
    cmd = [args.bin, "generate", "--model-dir", args.model_dir, "--prompt-ids", ",".join(map(str, ids)),
           "--max-new-tokens", str(args.tokens), "--ignore-eos", "--json", "--threads", str(args.threads),
           "--dtype", "bf16", "--gpus", "cpu"]

    def once():
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        return 1000.0 / r["tpot_ms"]
    return once


def llama_cpp(args, ids):
    from llama_cpp import Llama
    gguf = os.path.join(ROOT, "models", "cache", "smollm2-135m-bf16.gguf")
    if not os.path.exists(gguf):
        src = args.llama_src or next(iter(glob.glob(os.path.join(ROOT, "models", "cache", "llama_cpp_python-*",
                                                                 "vendor", "llama.cpp"))), None)
        if not src:
            raise SystemExit("need --llama-src (the llama.cpp tree with convert_hf_to_gguf.py)")
        env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))
        subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), args.model_dir, "--outtype",
                        "bf16", "--outfile", gguf], check=True, capture_output=True, env=env)
    llm = Llama(model_path=gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512, verbose=False)

    def once():
        llm.reset()
        times = []
        for _tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == args.tokens:
                break
        return (len(times) - 1) / (times[-1] - times[0])
    return once


def transformers_rate(args, ids, dtype_name):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    x = torch.tensor([ids])

    def once():
        with torch.inference_mode():
            t = time.perf_counter()
            model.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(x, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
            tn = time.perf_counter() - t
        return (args.tokens - 1) / (tn - t1)
    return once


def load_1min():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "models", "smollm2-bf16"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                  "release", "djinn-dataplane"))
    ap.add_argument("--llama-src", default=None)
    ap.add_argument("--skip", action="append", default=[], help="llama.cpp | transformers-f32 | transformers-bf16")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(args.model_dir)(PROMPT)["input_ids"]
    engines = [("djinn-dataplane (bf16)", lambda: ours(args, ids))]
    for name, setup in [("llama.cpp (bf16 gguf)", lambda: llama_cpp(args, ids)),
                        ("transformers-f32", lambda: transformers_rate(args, ids, "float32")),
                        ("transformers-bf16", lambda: transformers_rate(args, ids, "bfloat16"))]:
        if name.split(" ")[0] in args.skip or name in args.skip:
            continue
        engines.append((name, setup))
    runners = {}
    for name, setup in engines:
        try:
            runners[name] = setup()
        except Exception as e:  # a missing optional engine is reported, not fatal
            if not runners:
                raise
            print(f"{name}: skipped ({e})", file=sys.stderr)
    # Rounds interleave the engines, so a burst of load from elsewhere hits them alike; each
    # engine's best round is reported (the least disturbed one), with the 1-minute load average.
    rates = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, once in runners.items():
            rates[name].append((once(), load_1min()))
    best = {name: max(rs) for name, rs in rates.items()}
    mine = best["djinn-dataplane (bf16)"][0]
    print(f"SmolLM2-135M, batch 1, greedy, {args.tokens} tokens, {args.threads} threads, prompt {len(ids)} tokens, "
          f"best of {args.repeats} interleaved rounds")
    for name, (rate, load) in best.items():
        print(f"  {name:28s} {rate:8.1f} tokens/s   djinn/this = {mine / rate:5.2f}x   (load {load:.2f})")


if __name__ == "__main__":
    main()
