"""Python client of djinn-dataplane: run model inference and tensor ops on a remote server as if
the accelerator were local. The server keeps the weights, each session's KV cache and its
conversation, so a decode step crosses the wire as a few token ids.

    import djinn
    with djinn.connect("tcp://127.0.0.1:7070") as client:
        with client.open_session("smollm2", qos="interactive") as s:
            print(s.chat("What is the capital of France?", max_new_tokens=32).text)
            for token_id, text in s.chat("And of Italy?", stream=True):
                print(text, end="", flush=True)

Every call blocks with the GIL released. Errors are :class:`djinn.errors.DjinnError` and its
subclasses, carrying the server's status name in ``.status``.
"""

from __future__ import annotations

from . import errors
from ._djinn import Client, Generation, HostBuffer, Session, Tensor, TokenStream, connect
from .errors import DjinnError
from .graph import Graph, Node

__all__ = [
    "connect",
    "Client",
    "Session",
    "TokenStream",
    "Generation",
    "Tensor",
    "HostBuffer",
    "Graph",
    "Node",
    "DjinnError",
    "errors",
]
