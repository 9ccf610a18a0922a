#!/usr/bin/env python3
"""The transformers side of the GPU check (scripts/gpu-run), run on the GPU machine with the torch
and transformers found there (nothing is downloaded: the weights are random, made here).

1. SmolLM2-135M's shape (LlamaForCausalLM, 30 layers, hidden 576, 9 heads / 3 KV heads, vocab
   49152, tied embeddings) from_config with a fixed seed, bf16, saved to OUT/smol (safetensors),
   with OUT/smol/reference.json: the logits transformers computes in float32 (eager, on the GPU,
   over the same bf16 weights) at every position of two prompts, in the format of
   tests/data/models/*/reference.json, for benches/gpu_decode.rs to compare with.
2. Eager bf16 decode speed of that model and of a Llama-2-7B-shaped one (random, made on the GPU,
   never saved: 13.5 GB) at batch 1 and 16: tokens/s over STEPS greedy steps after a 16-token
   prompt, prefill and the first step excluded (the time of generate(STEPS + 1) minus that of
   generate(1)).

Writes OUT/hf.json. Exit 0 when done, 3 when skipped (no torch, transformers or GPU: the reason
is printed), 1 on failure.
Usage: scripts/gpu_hf.py --out DIR [--steps N] [--shapes smol,7b]
"""
import argparse
import json
import os
import sys
import time

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            head_dim=64, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128, vocab_size=32000, rope_theta=10000.0, tie_word_embeddings=False)
COMMON = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, hidden_act="silu")
PROMPT = 16
BATCHES = (1, 16)
REF_PROMPTS = (24, 11)  # 24 crosses a 16-token KV block


def skip(why):
    print(f"gpu_hf: skipped: {why}")
    sys.exit(3)


def build(torch, transformers, shape, seed):
    cfg = transformers.LlamaConfig(**shape, **COMMON)
    try:
        cfg._attn_implementation = "eager"
    except Exception:  # older/newer transformers: eager is the default there
        pass
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    # Parameters are bf16 already (the default dtype above); RoPE's inv_freq stays float32, as
    # our loader computes it (casting the model would round it to bf16).
    model = model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def decode_speed(torch, model, vocab, steps):
    rows = []
    for batch in BATCHES:
        g = torch.Generator(device="cpu").manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, PROMPT), generator=g).cuda()
        mask = torch.ones_like(ids)

        def gen(n):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        gen(2)  # warm-up
        t_one = min(gen(1) for _ in range(2))
        t_all = gen(steps + 1)
        step_s = max(t_all - t_one, 1e-9) / steps
        rows.append(dict(batch=batch, step_ms=step_s * 1e3, tok_s=batch / step_s))
        print(f"  transformers eager bf16, batch {batch:>3}: {step_s * 1e3:8.3f} ms/step, {batch / step_s:9.1f} tok/s")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--shapes", default="smol,7b")
    a = ap.parse_args()
    try:
        import torch
        import transformers
    except ImportError as e:
        skip(f"no torch/transformers here ({e})")
    if not torch.cuda.is_available():
        skip("torch sees no CUDA device")
    os.makedirs(a.out, exist_ok=True)
    out = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, transformers=transformers.__version__)
    shapes = a.shapes.split(",")
    with torch.inference_mode():
        if "smol" in shapes:
            print("smollm2_135m (random, transformers from_config, seed 0):")
            model = build(torch, transformers, SMOL, 0)
            smol = os.path.join(a.out, "smol")
            model.save_pretrained(smol, safe_serialization=True)
            # Float32 reference over the same bf16 weights (bf16 -> f32 is exact).
            model.float()
            g = torch.Generator(device="cpu").manual_seed(1)
            cases = []
            for n in REF_PROMPTS:
                prompt = torch.randint(3, SMOL["vocab_size"], (1, n), generator=g)
                logits = model(prompt.cuda()).logits[0].float().cpu()
                cases.append(dict(prompt=prompt[0].tolist(), logits=logits.tolist(),
                                  greedy=logits.argmax(-1).tolist()))
            with open(os.path.join(smol, "reference.json"), "w") as f:
                json.dump(dict(model="smollm2_135m random", cases=cases), f)
            model.to(torch.bfloat16)
            out["smollm2_135m"] = dict(decode=decode_speed(torch, model, SMOL["vocab_size"], a.steps))
            del model
            torch.cuda.empty_cache()
        if "7b" in shapes:
            print("llama2_7b (random, made on the GPU, not saved):")
            model = build(torch, transformers, LLAMA7B, 0)
            out["llama2_7b"] = dict(decode=decode_speed(torch, model, LLAMA7B["vocab_size"], a.steps))
            del model
            torch.cuda.empty_cache()
    with open(os.path.join(a.out, "hf.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"gpu_hf: wrote {os.path.join(a.out, 'hf.json')}")


if __name__ == "__main__":
    main()
