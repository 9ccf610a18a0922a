#!/usr/bin/env python3
"""Per-decode-step overhead of the Python client over the Rust client (issue 14's target:
≤ 10 µs), on one server, the committed tiny model, in one run, interleaved.

Each round runs REPS generate requests through the Rust client (python/bench/decode_steps.rs),
then REPS through Python as a token iterator (`Session.stream`) and REPS as one call
(`Session.generate`), each on a fresh session with the same 8-token prompt and NEW_TOKENS greedy
tokens. Per step = time from submission to the final frame over the tokens generated (the
figure benches/session_overhead.rs uses). Reported: the median of each side over all rounds and
the differences in µs per step, plus the load average.

    cargo build --release --example decode_steps -p djinn-py
    (cd python && maturin develop --release)
    python python/bench/decode_overhead.py [--rounds 7] [--reps 30] [--json]

The server is `$DJINN_BIN` or target/{release,debug}/djinn-dataplane, serving the tiny model
over tcp on loopback; both clients use the same one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import conftest  # noqa: E402  (the tests' server launcher and tiny-model writer)

import djinn  # noqa: E402

PROMPT = [9, 14, 61, 70, 83, 20, 33, 41]


def rust_example() -> Path:
    for profile in ("release", "debug"):
        p = conftest.REPO / "target" / profile / "examples" / "decode_steps"
        if p.exists():
            return p
    sys.exit("build the Rust baseline first: cargo build --release --example decode_steps -p djinn-py")


def rust_side(exe: Path, url: str, new_tokens: int, reps: int) -> list[float]:
    out = subprocess.run(
        [str(exe), url, "tiny", str(new_tokens), str(reps), *map(str, PROMPT)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)["per_step_us"]


def python_side(client: djinn.Client, new_tokens: int, reps: int, stream: bool) -> list[float]:
    per_step = []
    for _ in range(reps):
        s = client.open_session("tiny")
        t0 = time.perf_counter()
        if stream:
            n = 0
            last = None
            for tok in s.stream(PROMPT, max_new_tokens=new_tokens, ignore_eos=True):
                last = tok
                n += 1
        else:
            n = len(s.generate(PROMPT, max_new_tokens=new_tokens, ignore_eos=True).token_ids)
        us = (time.perf_counter() - t0) * 1e6
        s.close()
        assert n == new_tokens, (n, last)
        per_step.append(us / new_tokens)
    return per_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=48, help="≤ 64 - 8: the tiny model's context is 64")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    exe = rust_example()
    with tempfile.TemporaryDirectory() as tmp:
        model = conftest.write_tiny_model(Path(tmp) / "tiny")
        srv = conftest.Server(["--model", f"tiny={model}"], Path(tmp) / "server.stderr")
        try:
            client = djinn.connect(srv.url)
            # Warm-up of both sides (first connections, page faults, the server's first steps).
            rust_side(exe, srv.url, args.new_tokens, 5)
            python_side(client, args.new_tokens, 5, True)
            rust, py_stream, py_call = [], [], []
            for _ in range(args.rounds):
                rust += rust_side(exe, srv.url, args.new_tokens, args.reps)
                py_stream += python_side(client, args.new_tokens, args.reps, True)
                py_call += python_side(client, args.new_tokens, args.reps, False)
            client.close()
        finally:
            srv.stop()
    med = {k: statistics.median(v) for k, v in (("rust", rust), ("python_stream", py_stream), ("python_generate", py_call))}
    report = {
        "server": str(conftest.server_binary()),
        "rust_example": str(exe),
        "new_tokens": args.new_tokens,
        "samples_per_side": len(rust),
        "per_step_us_median": {k: round(v, 3) for k, v in med.items()},
        "overhead_us_per_step": {
            "stream": round(med["python_stream"] - med["rust"], 3),
            "generate": round(med["python_generate"] - med["rust"], 3),
        },
        "ratio_to_rust": {
            "stream": round(med["python_stream"] / med["rust"], 4),
            "generate": round(med["python_generate"] / med["rust"], 4),
        },
        "loadavg": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
