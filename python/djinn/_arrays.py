"""Array glue between the extension and numpy / torch: what crosses is a flat byte view of the
caller's memory (in) or of the received buffer (out), never a copy.

The extension calls :func:`as_bytes` before an upload and :func:`from_buffer` after a download;
both are internal. Tensors on the wire have one of the dtypes in ``DTYPES``; numpy has no
bfloat16, so bf16 tensors come back as ``uint16`` bit patterns (``Tensor.torch()`` gives a real
``torch.bfloat16`` tensor over the same memory).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Wire dtype name → numpy dtype of the same size and bits.
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(np.uint16),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
    "u8": np.dtype(np.uint8),
}
_FROM_NUMPY: dict[np.dtype, str] = {v: k for k, v in DTYPES.items() if k != "bf16"}


def _torch_tensor(x: Any) -> Any:
    """`x` if it is a torch tensor (without importing torch when it is not loaded), else None."""
    mod = type(x).__module__
    return x if mod.startswith("torch") and hasattr(x, "data_ptr") else None


def as_bytes(x: Any, dtype: str | None = None) -> tuple[memoryview, str, tuple[int, ...]]:
    """A C-contiguous byte view of `x` (numpy array, torch CPU tensor, any DLPack or buffer
    object), its wire dtype and its shape. Contiguous inputs are viewed, not copied; a
    non-contiguous one is made contiguous first (one copy, as numpy itself would)."""
    wire = None
    t = _torch_tensor(x)
    if t is not None:
        import torch

        if t.device.type != "cpu":
            raise ValueError(f"tensor is on {t.device}; move it to the CPU (.cpu()) to upload it")
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype == torch.bfloat16:
            wire, t = "bf16", t.view(torch.int16)
        arr = t.numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    elif hasattr(x, "__dlpack__"):
        arr = np.from_dlpack(x)
    else:
        arr = np.asarray(x)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    if wire is None:
        if dtype is not None:
            wire = dtype
            if DTYPES[wire].itemsize != arr.dtype.itemsize:
                raise ValueError(f"dtype {dtype} needs {DTYPES[wire].itemsize}-byte elements, array has {arr.dtype}")
        else:
            try:
                wire = _FROM_NUMPY[arr.dtype]
            except KeyError:
                raise ValueError(
                    f"dtype {arr.dtype} has no wire form; use float32, float16, int32, int64 or uint8 "
                    "(or a torch bfloat16 tensor)"
                ) from None
    return memoryview(arr).cast("B"), wire, tuple(arr.shape)


def from_buffer(buf: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy array over `buf`'s memory (a download's buffer), no copy."""
    return np.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)


def to_torch(arr: np.ndarray, dtype: str) -> Any:
    """A torch CPU tensor sharing `arr`'s memory (bf16 reinterpreted from its uint16 bits)."""
    import torch

    if dtype == "bf16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
