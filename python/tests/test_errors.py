"""Errors from Python: each is a DjinnError; server refusals carry the status name, code and
opcode and pick a subclass per common status; client-side errors have status None."""

from __future__ import annotations

import numpy as np
import pytest

import djinn
from djinn import errors


def test_connect_refused_is_connect_error():
    with pytest.raises(errors.ConnectError) as e:
        djinn.connect("tcp://127.0.0.1:1")
    assert e.value.status is None and "start a server there" in str(e.value)


def test_wrong_token_is_unauthorized(auth_server):
    with pytest.raises(errors.UnauthorizedError) as e:
        djinn.connect(auth_server.url, token="tok-mallory")
    assert (e.value.status, e.value.code, e.value.opcode) == ("Unauthorized", 6, "Hello")
    with pytest.raises(errors.UnauthorizedError):
        djinn.connect(auth_server.url)


def test_unknown_model(client):
    with pytest.raises(errors.UnknownModelError) as e:
        client.open_session("nope")
    err = e.value
    assert isinstance(err, djinn.DjinnError) and isinstance(err, LookupError)
    assert (err.status, err.code, err.opcode) == ("UnknownModel", 14, "SessionOpen")
    assert "nope" in str(err)
    with pytest.raises(errors.UnknownModelError):
        client.logits("nope", [1])


def test_unknown_session(client):
    with pytest.raises(errors.UnknownSessionError) as e:
        client.attach(12345)
    assert e.value.status == "UnknownSession"


def test_bad_arguments_from_the_server(client):
    with client.open_session("raw") as s:
        with pytest.raises(errors.InvalidArgumentError) as e:
            s.generate("text needs a tokenizer", max_new_tokens=1)
        assert e.value.status == "BadArgument" and isinstance(e.value, ValueError)
        with pytest.raises(errors.InvalidArgumentError):
            s.prefill([5, 128])  # out of the vocabulary
        with pytest.raises(errors.InvalidArgumentError):
            s.prefill(list(range(8, 8 + 65)))  # longer than the model's context
    a = client.put(np.ones((2, 3), np.float32))
    b = client.put(np.ones((2, 3), np.float32))
    with pytest.raises(errors.InvalidArgumentError) as e:
        client.exec("matmul", a, b)
    assert e.value.status == "ShapeMismatch" and e.value.opcode == "Exec"


def test_client_side_errors_have_no_status(client):
    with pytest.raises(errors.InvalidArgumentError) as e:
        client.exec("no_such_op")
    assert e.value.status is None and "matmul" in str(e.value)
    with pytest.raises(ValueError):
        client.put(np.ones(3, dtype=np.complex64))
    t = client.put(np.ones(3, np.float32))
    t.free()
    with pytest.raises(errors.ClosedError):
        t.numpy()
    with pytest.raises(errors.InvalidArgumentError):
        client.open_session("tiny").prefill(object())  # type: ignore[arg-type]


def test_every_status_subclass_is_a_djinn_error():
    for name, cls in errors.STATUS_CLASSES.items():
        assert issubclass(cls, errors.DjinnError), name
        err = errors._make("server", "m", name, 1, "Op")
        assert type(err) is cls and err.status == name
    assert type(errors._make("server", "m", "Internal", 16, "Op")) is errors.DjinnError
