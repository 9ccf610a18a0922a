"""Sessions from Python against a real server: every call, greedy tokens equal to the committed
reference (transformers), stream = one call, chat turns on the server-kept conversation, attach,
QoS classes, cancel, the one-stream-per-connection rule, and context managers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import start_server

import djinn
from djinn import errors


def test_connect_models_info(client, server):
    assert client.models() == ["tiny", "raw"]
    info = client.info()
    assert info["backend"] == "cpu" and info["models"] == ["tiny", "raw"] and "tcp" in info["transports"]
    assert client.url == server.url and client.transport.startswith("tcp")
    assert client.ping(b"abc") == b"abc"
    assert dict(client.stats())["connections_active"] >= 1


def test_generate_matches_reference(client, reference):
    for case in reference["cases"]:
        n = len(case["greedy"])
        with client.open_session("raw") as s:
            g = s.generate(case["prompt"], max_new_tokens=n, ignore_eos=True)
        assert g.token_ids == case["greedy"]
        assert (g.finish, g.prompt_tokens, g.context_tokens) == ("length", len(case["prompt"]), len(case["prompt"]) + n)


def test_stream_equals_one_call(client):
    prompt = [9, 14, 61, 70, 83, 20, 33]
    with client.open_session("tiny") as a, client.open_session("tiny") as b:
        g = a.generate(prompt, max_new_tokens=12, ignore_eos=True)
        st = b.stream(prompt, max_new_tokens=12, ignore_eos=True)
        assert st.finish is None and st.session_id == b.id
        pairs = list(st)
        assert [t for t, _ in pairs] == g.token_ids
        assert "".join(x for _, x in pairs) == g.text
        assert (st.finish, st.tokens, st.prompt_tokens, st.context_tokens) == ("length", 12, 7, 19)
        assert list(st) == []  # exhausted stays exhausted
    with client.open_session("tiny") as c:  # ids as a numpy array
        assert c.generate(np.array(prompt), max_new_tokens=12, ignore_eos=True).token_ids == g.token_ids


def test_text_prompt_and_prefill_decode(client):
    with client.open_session("tiny") as a, client.open_session("tiny") as b:
        g = a.generate("w10 w11 w12", max_new_tokens=6, ignore_eos=True)
        assert g.prompt_tokens == 3 and len(g.token_ids) == 6 and g.text
        # The same input fed by prefill, then a decode without new input: the same tokens.
        assert b.prefill("w10 w11 w12") == (3, 3)
        assert b.generate(max_new_tokens=6, ignore_eos=True).token_ids == g.token_ids
        assert b.prefill([20, 21]) == (2, 11)


def test_chat_turns_keep_the_conversation(client):
    """Three turns on one session equal the same turns appended then decoded on another: the
    server keeps the history and each turn sends only its own text."""
    turns = ["w20 w21 w22", "w30 w31", "w40"]
    with client.open_session("tiny") as a, client.open_session("tiny") as b:
        assert a.has_tokenizer and a.has_chat_template
        for i, t in enumerate(turns):
            if i == 1:
                got = "".join(x for _, x in a.chat(t, stream=True, max_new_tokens=8))
            else:
                got = a.chat(t, max_new_tokens=8).text
            b.append(t)
            want = b.generate(max_new_tokens=8).text
            assert got == want
        a.append("w50", role="system")
        with pytest.raises(errors.InvalidArgumentError):
            a.chat("w1", role="assistant")


def test_attach_from_another_connection(auth_server):
    """Same tenant (token) on a second connection attaches; another tenant cannot see it."""
    with djinn.connect(auth_server.url, token="tok-alice") as a, djinn.connect(auth_server.url, token=b"tok-alice") as a2:
        s = a.open_session("tiny")
        s.prefill([9, 14, 61])
        s2 = a2.attach(s.id)
        assert (s2.id, s2.context_tokens, s2.vocab) == (s.id, 3, 128)
        assert s2.generate([70], max_new_tokens=3, ignore_eos=True).context_tokens == 7
        with djinn.connect(auth_server.url, token="tok-bob") as b:
            with pytest.raises(errors.UnknownSessionError) as e:
                b.attach(s.id)
            assert e.value.status == "UnknownSession"
        s2.close()


@pytest.mark.parametrize("qos", ["realtime", "interactive", "batch", None])
def test_qos_classes(client, qos):
    with client.open_session("tiny", qos=qos, max_tokens=32, deadline_ms=50) as s:
        assert s.max_tokens == 32
        assert len(s.generate([9, 14], max_new_tokens=2, ignore_eos=True).token_ids) == 2


def test_qos_unknown_is_value_error(client):
    with pytest.raises(ValueError, match="unknown QoS class"):
        client.open_session("tiny", qos="urgent")


def test_logits_numpy(client, reference):
    case = reference["cases"][0]
    lg = client.logits("raw", case["prompt"])
    assert lg.shape == (len(case["prompt"]), 128) and lg.dtype == np.float32
    np.testing.assert_allclose(lg, np.array(case["logits"], dtype=np.float32), rtol=1e-3, atol=1e-3)
    assert int(lg[-1].argmax()) == case["greedy"][0]


def test_close_cancels_a_running_stream(client):
    with client.open_session("tiny") as s:
        with s.stream([9, 14], max_new_tokens=50, ignore_eos=True) as st:
            first = next(st)
            assert isinstance(first[0], int) and isinstance(first[1], str)
        assert st.finish in ("cancelled", "length") and list(st) == []
        # The connection is in step again.
        assert len(s.generate([20], max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_one_stream_per_connection(client):
    with client.open_session("tiny") as s:
        st = s.stream([9, 14], max_new_tokens=20, ignore_eos=True)
        next(st)
        with pytest.raises(errors.ClientBusyError) as e:
            s.generate([1], max_new_tokens=1)
        assert e.value.status is None
        del st  # abandoned: the next call cancels and drains it
        assert len(s.generate([20], max_new_tokens=2, ignore_eos=True).token_ids) == 2


def test_context_managers_close(server):
    with djinn.connect(server.url) as c:
        with c.open_session("tiny") as s:
            s.prefill([9])
        with pytest.raises(errors.UnknownSessionError):
            c.attach(s.id)
    assert c.closed
    with pytest.raises(errors.ClosedError):
        c.open_session("tiny")


def test_session_close_is_idempotent(client):
    with client.open_session("tiny") as s:
        s.close()
    s.close()


def test_over_shared_memory(tmp_path_factory, tiny_model, reference):
    """The same calls over shm:// (the server's shared-memory transport)."""
    try:
        srv = start_server(tmp_path_factory, tiny_model, listen=f"shm://djt-py-{os.getpid()}")
    except RuntimeError as e:
        pytest.skip(f"shm transport unavailable here: {e}")
    try:
        with djinn.connect(srv.url) as c:
            assert c.transport == "shm"
            case = reference["cases"][0]
            with c.open_session("raw") as s:
                toks = [t for t, _ in s.stream(case["prompt"], max_new_tokens=len(case["greedy"]), ignore_eos=True)]
            assert toks == case["greedy"]
            x = np.arange(1 << 16, dtype=np.float32)
            assert np.array_equal(c.put(x).numpy(), x)
    finally:
        srv.stop()
