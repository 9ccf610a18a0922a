#!/usr/bin/env python3
"""Per-decode-step overhead of the Python client over the Rust client (issue 14's target:
≤ 10 µs), on one server, the committed tiny model, in one run, interleaved.

Two measures, each over REPS requests per side per round, the sides' order alternating by round,
each request on a fresh session with the same 8-token prompt and NEW_TOKENS greedy tokens:

- e2e: time from submission to the final frame over the tokens generated (the figure
  benches/session_overhead.rs uses): Rust `Client::generate` (python/bench/decode_steps.rs)
  against Python's token iterator (`Session.stream`) and one call (`Session.generate`). The
  server computes while the client reads, so a client cost below the server's step is hidden.
- drain: the request is started, the client waits until the server has sent every token, then
  reading them is timed: each client's own cost per token, none of the server's (Rust
  `stream_next` against Python's `TokenStream.__next__`). The target applies to this one too.

Reported: medians and 10th percentiles per side, the Python − Rust differences in µs per step
(of the medians, of the 10th percentiles, and the median of the per-round paired differences),
and the load average.

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


DRAIN_WAIT_S = 0.03  # as DRAIN_WAIT in decode_steps.rs


def rust_side(exe: Path, url: str, new_tokens: int, reps: int, mode: str = "e2e") -> list[float]:
    out = subprocess.run(
        [str(exe), url, "tiny", str(new_tokens), str(reps), mode, *map(str, PROMPT)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)["per_step_us"]


def python_side(client: djinn.Client, new_tokens: int, reps: int, stream: bool, drain: bool = False) -> list[float]:
    per_step = []
    for _ in range(reps):
        s = client.open_session("tiny")
        n, last = 0, None
        if drain:
            st = s.stream(PROMPT, max_new_tokens=new_tokens, ignore_eos=True)
            time.sleep(DRAIN_WAIT_S)
            t0 = time.perf_counter()
            for tok in st:
                last = tok
                n += 1
        elif stream:
            t0 = time.perf_counter()
            for tok in s.stream(PROMPT, max_new_tokens=new_tokens, ignore_eos=True):
                last = tok
                n += 1
        else:
            t0 = time.perf_counter()
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
            sides = {
                "rust": lambda: rust_side(exe, srv.url, args.new_tokens, args.reps),
                "python_stream": lambda: python_side(client, args.new_tokens, args.reps, True),
                "python_generate": lambda: python_side(client, args.new_tokens, args.reps, False),
                "rust_drain": lambda: rust_side(exe, srv.url, args.new_tokens, args.reps, "drain"),
                "python_drain": lambda: python_side(client, args.new_tokens, args.reps, True, drain=True),
            }
            runs: dict[str, list[list[float]]] = {k: [] for k in sides}
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for k in order:
                    runs[k].append(sides[k]())
            client.close()
        finally:
            srv.stop()
    med = {k: statistics.median(x for rnd in v for x in rnd) for k, v in runs.items()}
    # The 10th percentile: what each side costs when the loaded machine leaves it alone.
    p10 = {k: statistics.quantiles([x for rnd in v for x in rnd], n=10)[0] for k, v in runs.items()}

    def paired(py: str, rust: str) -> float:
        diffs = [statistics.median(a) - statistics.median(b) for a, b in zip(runs[py], runs[rust])]
        return round(statistics.median(diffs), 3)

    report = {
        "server": str(conftest.server_binary()),
        "rust_example": str(exe),
        "new_tokens": args.new_tokens,
        "samples_per_side": args.rounds * args.reps,
        "per_step_us_median": {k: round(v, 3) for k, v in med.items()},
        "overhead_us_per_step": {
            "e2e_stream": round(med["python_stream"] - med["rust"], 3),
            "e2e_generate": round(med["python_generate"] - med["rust"], 3),
            "drain_stream": round(med["python_drain"] - med["rust_drain"], 3),
        },
        "per_step_us_p10": {k: round(v, 3) for k, v in p10.items()},
        "overhead_us_per_step_p10": {
            "e2e_stream": round(p10["python_stream"] - p10["rust"], 3),
            "e2e_generate": round(p10["python_generate"] - p10["rust"], 3),
            "drain_stream": round(p10["python_drain"] - p10["rust_drain"], 3),
        },
        "overhead_us_per_step_paired_by_round": {
            "e2e_stream": paired("python_stream", "rust"),
            "e2e_generate": paired("python_generate", "rust"),
            "drain_stream": paired("python_drain", "rust_drain"),
        },
        "ratio_to_rust": {
            "e2e_stream": round(med["python_stream"] / med["rust"], 4),
            "e2e_generate": round(med["python_generate"] / med["rust"], 4),
            "drain_stream": round(med["python_drain"] / med["rust_drain"], 4),
        },
        "loadavg": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
