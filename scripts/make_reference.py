#!/usr/bin/env python3
"""Makes the small random reference checkpoints under tests/data/models/ and records what
Hugging Face transformers (float32, CPU) computes for them: logits at every prompt position and
greedy continuations. tests/model_reference.rs compares the CPU backend against these files, so
the Rust tests need no Python.

Usage: pip install torch transformers safetensors; python3 scripts/make_reference.py [OUT_DIR] [--only NAME,...]

For the model with at least 4 layers (BREAK_MODEL) it also records breakpoints.json
(tests/breakpoint_reference.rs): the residual stream after every layer N (transformers'
`hidden_states[N]` for N < L, the input of the final norm for N = L) and, for a few N, the logits
at every prompt position and the greedy tokens when a forward hook on `model.model.layers[N-1]`
replaces that layer's output with a given state during the input pass (decode steps run through).

Weights are re-initialised with unit-scale distributions (not transformers' std=0.02) so logits
spread out and greedy choices are not near-ties; the script checks the top-2 margin of every
recorded greedy step and re-draws the prompt when a margin is too thin to be a fair test.
"""
import argparse
import json
import os
import sys
import zlib

import torch
import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

ARGS = argparse.ArgumentParser()
ARGS.add_argument("out", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "models"))
ARGS.add_argument("--only", default="", help="comma-separated model names to (re)make; default all")
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
    "llama-deep": (LlamaConfig, LlamaForCausalLM, dict(num_hidden_layers=4)),
}

BREAK_MODEL = "llama-deep"
BREAK_PROMPT_LEN = 11
BREAK_PATCH_LAYERS = [1, 2, 4]  # 4 = L: the state the final norm reads


def exact(t):
    """float32 values as JSON numbers that parse back (as f64, then cast) to the same float32."""
    return [[float(x) for x in row] for row in t.tolist()]


def layer_outputs(model, ids):
    """Output of every decoder layer for `ids` (batch of one): the residual stream after it."""
    got = {}

    def grab(n):
        def hook(_mod, _inp, out):
            got[n] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
        return hook

    hooks = [layer.register_forward_hook(grab(i + 1)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return got, out.hidden_states


def patched(model, ids, n, repl):
    """Logits of the input pass and greedy tokens, with layer n's output replaced by `repl` on
    the input pass only (the first call whose sequence is the whole prompt)."""
    plen = ids.shape[1]

    def run():
        state = dict(done=False)

        def hook(_mod, _inp, out):
            hs = out[0] if isinstance(out, tuple) else out
            if state["done"] or hs.shape[1] != plen:
                return None
            state["done"] = True
            new = repl.unsqueeze(0).to(hs.dtype)
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
        return model.model.layers[n - 1].register_forward_hook(hook)

    h = run()
    try:
        with torch.no_grad():
            logits = model(ids).logits[0]
    finally:
        h.remove()
    h = run()
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
    finally:
        h.remove()
    return logits, out


def record_breakpoints(model, cfg, gen, d):
    layers = cfg.num_hidden_layers
    assert layers >= 4
    for attempt in range(50):
        ids = torch.randint(3, VOCAB, (1, BREAK_PROMPT_LEN), generator=gen)
        got, hs = layer_outputs(model, ids)
        for n in range(1, layers):
            assert torch.equal(got[n], hs[n][0]), f"layer {n} output is not hidden_states[{n}]"
        with torch.no_grad():
            plain = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                                   output_scores=True, return_dict_in_generate=True)
        clear = min(margins(plain.scores)) >= MIN_MARGIN
        plain = plain.sequences[0, BREAK_PROMPT_LEN:].tolist()
        patches = []
        for n in BREAK_PATCH_LAYERS:
            h = got[n]
            repl = (h + torch.randn(h.shape, generator=gen) * h.std()).to(torch.float32)
            logits, out = patched(model, ids, n, repl)
            pos_margin = [float((t[0] - t[1]) / logits[i].abs().max())
                          for i, t in enumerate(torch.topk(logits, 2).values)]
            clear = clear and min(margins(out.scores)) >= MIN_MARGIN and min(pos_margin) >= MIN_MARGIN / 4
            patches.append(dict(layer=n, hidden=exact(repl), logits=[[round(float(x), 6) for x in r] for r in logits],
                                greedy=out.sequences[0, BREAK_PROMPT_LEN:].tolist()))
        # A fair test: clear margins everywhere, and a patch that changes the continuation.
        changed = sum(p["greedy"] != plain for p in patches)
        print(f"{BREAK_MODEL} attempt {attempt}: clear margins {clear}, {changed} patches change the tokens",
              file=sys.stderr)
        if clear and changed > 0:
            break
    else:
        raise SystemExit(f"{BREAK_MODEL}: no prompt and patches with clear greedy margins")
    rec = dict(model=BREAK_MODEL, layers=layers, prompt=ids[0].tolist(), greedy=plain,
               hidden=[dict(layer=n, hidden=[[round(float(x), 7) for x in r] for r in got[n].tolist()])
                       for n in range(1, layers + 1)],
               patches=patches)
    with open(os.path.join(d, "breakpoints.json"), "w") as f:
        json.dump(rec, f, separators=(",", ":"))


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
    args = ARGS.parse_args()
    only = set(filter(None, args.only.split(",")))
    torch.manual_seed(0)
    for name, (cfg_cls, model_cls, extra) in MODELS.items():
        if only and name not in only:
            continue
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
        d = os.path.join(args.out, name)
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
        if name == BREAK_MODEL:
            record_breakpoints(model, cfg, gen, d)
        print(f"{name}: {sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d)) // 1024} KiB")


if __name__ == "__main__":
    main()
