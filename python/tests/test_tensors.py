"""Remote tensors with numpy (and torch when installed): round trips per dtype, zero-copy in and
out, single ops and graphs against numpy, and freeing."""

from __future__ import annotations

import resource
import tracemalloc

import numpy as np
import pytest

import djinn


def host_buffer_of(arr: np.ndarray):
    """The HostBuffer at the root of `arr`'s base chain (None if arr owns a copy)."""
    b: object = arr
    while isinstance(b, np.ndarray):
        b = b.base
    return b


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.int64, np.uint8])
def test_round_trip(client, dtype):
    x = (np.arange(24).reshape(2, 3, 4) % 50).astype(dtype)
    t = client.put(x)
    assert (t.shape, t.nbytes) == ([2, 3, 4], x.nbytes)
    y = t.numpy()
    assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(x, y)
    assert np.array_equal(client.get(t), x)


def test_bf16_as_uint16_bits(client):
    bits = np.array([0x3F80, 0x4000, 0xC040], dtype=np.uint16)  # 1.0, 2.0, -3.0
    t = client.put(bits, dtype="bf16")
    assert t.dtype == "bf16"
    assert np.array_equal(t.numpy(), bits)
    f = client.exec("cast", t, i64=[0])  # to f32
    assert np.array_equal(f.numpy(), np.array([1.0, 2.0, -3.0], np.float32))


def test_download_is_zero_copy(client):
    x = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    y = client.put(x).numpy()
    buf = host_buffer_of(y)
    assert isinstance(buf, djinn.HostBuffer), type(buf)
    assert y.ctypes.data == buf.address and len(buf) == x.nbytes
    assert y.flags.writeable
    y[0, 0] = 5.0  # the array owns its memory through the buffer: writes stick
    assert memoryview(buf).cast("f")[0] == 5.0
    lg = client.logits("raw", [9, 14])
    assert isinstance(host_buffer_of(lg), djinn.HostBuffer) and lg.ctypes.data == host_buffer_of(lg).address


def test_upload_is_zero_copy(client):
    """Uploading 64 MiB allocates no Python/numpy copy (tracemalloc sees numpy's allocations) and
    grows the peak RSS by far less than the array (a copy anywhere would add 64 MiB)."""
    x = np.ones((16, 1024, 1024), dtype=np.float32)  # 64 MiB, touched
    x.sum()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    t = client.put(x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak < 1 << 20, f"tracemalloc peak {peak} bytes during put"
    assert rss1 - rss0 < x.nbytes // 2, f"peak RSS grew by {rss1 - rss0} bytes"
    t.free()


def test_non_contiguous_and_other_inputs(client):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(client.put(x.T).numpy(), x.T)  # made contiguous (one copy)
    assert np.array_equal(client.put(memoryview(x)).numpy(), x)  # any buffer object
    assert np.array_equal(client.put(np.float32(2.5)).numpy(), np.float32(2.5))  # 0-d


class DlpackOnly:
    """An object that offers its memory through DLPack alone (as jax or cupy-on-host arrays do)."""

    def __init__(self, arr: np.ndarray):
        self._arr = arr

    def __dlpack__(self, **kw):
        return self._arr.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


def test_dlpack_input_is_viewed(client):
    x = np.arange(1 << 20, dtype=np.int32)
    tracemalloc.start()
    t = client.put(DlpackOnly(x))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < x.nbytes // 4, f"tracemalloc peak {peak} bytes: the DLPack input was copied"
    assert t.dtype == "i32" and np.array_equal(t.numpy(), x)


def test_ops_match_numpy(client):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((4, 8)).astype(np.float32)
    b = rng.standard_normal((8, 5)).astype(np.float32)
    ta, tb = client.put(a), client.put(b)
    np.testing.assert_allclose(client.exec("matmul", ta, tb).numpy(), a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(client.exec("scale", ta, f32=[0.5]).numpy(), a * 0.5, rtol=1e-6)
    np.testing.assert_allclose(client.exec("add", ta, ta).numpy(), a + a, rtol=1e-6)
    assert np.array_equal(client.exec("argmax", ta).numpy(), a.argmax(-1).astype(np.int32))


def test_graph_in_one_request(client):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    tx, tw = client.put(x), client.put(w)
    g = djinn.Graph()
    h = g.op("matmul", tx, tw)
    p = g.op("softmax", h)
    logits, probs = g.run(client, h, p)
    e = np.exp(x @ w - (x @ w).max(-1, keepdims=True))
    np.testing.assert_allclose(logits.numpy(), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs.numpy(), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_tensors_are_freed(client):
    def live() -> int:
        return dict(client.stats())["tensors_live"]

    base = live()
    t = client.put(np.ones(4, np.float32))
    with client.put(np.ones(4, np.float32)) as u:
        assert live() == base + 2
    assert live() == base + 1
    del t  # dropped: freed with the connection's next request
    assert live() == base
    v = client.put(np.ones(4, np.float32))
    client.free(v)
    assert live() == base


def test_torch_tensors(client):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch to run the torch cases)")
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = client.put(x)
    y = t.torch()
    assert torch.equal(x, y)
    # Tensor.torch views the downloaded array (torch.from_numpy), which views the received bytes:
    # the same conversion on a download shares the HostBuffer's memory. (A torch tensor's own
    # .numpy() is based on the tensor, so the base chain cannot be walked from `y`.)
    from djinn import _arrays

    arr = t.numpy()
    z = _arrays.to_torch(arr, t.dtype)
    assert z.data_ptr() == host_buffer_of(arr).address  # shares the received memory
    bf = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    tb = client.put(bf)
    assert tb.dtype == "bf16" and torch.equal(tb.torch(), bf)
    np.testing.assert_allclose(client.exec("matmul", t, client.put(x.T.contiguous())).torch().numpy(), (x @ x.T).numpy())
