"""A real model when it is here (`models/smollm2-135m-instruct`, fetched by .ci/run): chat with
the model's own template and tokenizer, streamed and in one call giving the same greedy text."""

from __future__ import annotations

import pytest
from conftest import REPO, Server

import djinn

MODEL_DIR = REPO / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory):
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip(f"{MODEL_DIR} is absent (scripts/fetch_smollm2.sh fetches it)")
    s = Server(["--model", f"smollm2={MODEL_DIR}"], tmp_path_factory.mktemp("smol") / "server.stderr")
    yield s
    s.stop()


def test_chat_streamed_equals_one_call(smol_server):
    with djinn.connect(smol_server.url) as c, c.open_session("smollm2") as a, c.open_session("smollm2") as b:
        assert a.has_chat_template and a.has_tokenizer
        one = a.chat("What is the capital of France?", max_new_tokens=12)
        streamed = "".join(t for _, t in b.chat("What is the capital of France?", stream=True, max_new_tokens=12))
        assert one.text == streamed and one.text.strip()
        assert "Paris" in one.text, one.text
        two = a.chat("And of Italy?", max_new_tokens=12)
        assert two.prompt_tokens < one.context_tokens, "a turn sends only its own text"
