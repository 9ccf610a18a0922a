#!/usr/bin/env python3
"""Makes the small random reference checkpoints under tests/data/models/ and records what
Hugging Face transformers (float32, CPU) computes for them: logits at every prompt position and
greedy continuations. tests/model_reference.rs compares the CPU backend against these files, so
the Rust tests need no Python.

Usage: pip install torch transformers safetensors; python3 scripts/make_reference.py [OUT_DIR]

Weights are re-initialised with unit-scale distributions (not transformers' std=0.02) so logits
spread out and greedy choices are not near-ties; the script checks the top-2 margin of every
recorded greedy step and re-draws the prompt when a margin is too thin to be a fair test.
"""
import json
import os
import sys
import zlib

import torch
import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "data", "models")
VOCAB = 128
PROMPT_LENS = [5, 19]  # 19 crosses a 16-token KV block
NEW_TOKENS = 8
MIN_MARGIN = 0.02  # top-1 minus top-2 logit, in units of max |logit|, at every greedy step

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)

MODELS = {
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=10000.0)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(rope_theta=100000.0, sliding_window=None)),
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=1000000.0, num_key_value_heads=1)),
    "llama3-tied": (LlamaConfig, LlamaForCausalLM,
                    dict(tie_word_embeddings=True, num_key_value_heads=4,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=16), rope_theta=500000.0)),
    "llama-headdim": (LlamaConfig, LlamaForCausalLM, dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2)),
}


def reinit(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed_tokens" in name else 1.0 / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:  # norm weights
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def margins(scores):
    out = []
    for s in scores:
        top = torch.topk(s[0], 2).values
        out.append(float((top[0] - top[1]) / s[0].abs().max()))
    return out


def main():
    torch.manual_seed(0)
    for name, (cfg_cls, model_cls, extra) in MODELS.items():
        kw = dict(COMMON)
        kw.update(extra)
        if "rope_scaling" in kw or "rope_theta" in kw:
            params = dict(kw.pop("rope_scaling", None) or dict(rope_type="default"))
            params["rope_theta"] = kw.pop("rope_theta", 10000.0)
            kw["rope_parameters"] = params
        cfg = cfg_cls(**kw)
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        model = model_cls(cfg).eval().to(torch.float32)
        reinit(model, gen)
        if cfg.tie_word_embeddings:
            model.tie_weights()
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        for f in os.listdir(d):
            assert os.path.getsize(os.path.join(d, f)) < 1 << 20, f
        cases = []
        for plen in PROMPT_LENS:
            for attempt in range(50):
                ids = torch.randint(3, VOCAB, (1, plen), generator=gen)
                with torch.no_grad():
                    logits = model(ids).logits[0]
                    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
                pos_margin = [float((t[0] - t[1]) / logits[i].abs().max())
                              for i, t in enumerate(torch.topk(logits, 2).values)]
                if min(margins(out.scores)) >= MIN_MARGIN and min(pos_margin) >= MIN_MARGIN / 4:
                    break
            else:
                raise SystemExit(f"{name}: no prompt with clear greedy margins")
            cases.append(dict(prompt=ids[0].tolist(), logits=[[round(float(x), 6) for x in row] for row in logits],
                              greedy=out.sequences[0, plen:].tolist()))
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump(dict(model=name, transformers=transformers.__version__, torch=torch.__version__,
                           new_tokens=NEW_TOKENS, cases=cases), f, separators=(",", ":"))
        print(f"{name}: {sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d)) // 1024} KiB")


if __name__ == "__main__":
    main()
