"""Fixtures: real `djinn-dataplane serve` processes on loopback (no mocks).

The binary is `$DJINN_BIN`, else the repository's target/debug (then target/release) build.
Models: `tiny` is the committed llama-gqa test model with a word-level tokenizer and a ChatML
template added in a temporary copy (every id a word, as tests/server_sessions.rs does), so text
and chat run in milliseconds; `raw` is the same model without a tokenizer.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

import djinn

REPO = Path(__file__).resolve().parents[2]
SRC_MODEL = REPO / "tests" / "data" / "models" / "llama-gqa"
VOCAB = 128
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
START_TIMEOUT_S = 60


def server_binary() -> Path:
    env = os.environ.get("DJINN_BIN")
    if env:
        return Path(env)
    for profile in ("debug", "release"):
        p = REPO / "target" / profile / "djinn-dataplane"
        if p.exists():
            return p
    pytest.exit("no djinn-dataplane binary: run `cargo build --bin djinn-dataplane` or set DJINN_BIN", 2)


def word(i: int) -> str:
    return {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<|im_start|>", 4: "<|im_end|>", 5: "user", 6: "assistant", 7: "system"}.get(
        i, f"w{i}"
    )


def write_tiny_model(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(SRC_MODEL / f, dest / f)
    added = [
        {"id": i, "content": word(i), "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": False}
        for i in range(5)
    ]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {word(i): i for i in range(VOCAB)}, "unk_token": "<unk>"},
    }
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    cfg = {"eos_token": "<|im_end|>", "bos_token": "<s>", "chat_template": TEMPLATE}
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


class Server:
    """A running `serve` process; its first `listening URL` line gives the URL."""

    def __init__(self, args: list[str], log: Path, listen: str = "tcp://127.0.0.1:0"):
        self.log = log
        self.proc = subprocess.Popen(
            [str(server_binary()), "serve", "--listen", listen, "--gpus", "cpu", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError(f"server did not start; stderr:\n{log.read_text()}")
            if line.startswith("listening "):
                self.url = line.split(None, 1)[1].strip()
                return

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("auth") / "tokens"
    p.write_text("alice tok-alice\nbob tok-bob\n")
    return p


def start_server(tmp_path_factory, tiny_model: Path, *extra: str, listen: str = "tcp://127.0.0.1:0") -> Server:
    log = tmp_path_factory.mktemp("log") / "server.stderr"
    # f32 as stored: the suite compares with transformers' f32 reference (serve defaults to bf16).
    args = ["--dtype", "f32"] if "--dtype" not in extra else []
    return Server([*args, "--model", f"tiny={tiny_model}", "--model", f"raw={SRC_MODEL}", *extra], log, listen)


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model):
    s = start_server(tmp_path_factory, tiny_model)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory, tiny_model, tokens_file):
    s = start_server(tmp_path_factory, tiny_model, "--auth-token-file", str(tokens_file))
    yield s
    s.stop()


@pytest.fixture
def own_server(tmp_path_factory, tiny_model):
    """A server of the test's own (for tests that stop or disturb it)."""
    s = start_server(tmp_path_factory, tiny_model)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    c = djinn.connect(server.url)
    yield c
    c.close()


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((SRC_MODEL / "reference.json").read_text())
