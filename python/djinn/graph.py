"""A small op graph run in one request (`Client.run`): intermediate results stay on the server
and only the outputs asked for become Tensors.

    g = djinn.Graph()
    h = g.op("matmul", x, w)          # x, w: Tensors already on the server
    y = g.op("softmax", h)
    (probs,) = g.run(client, y)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence, Union

if TYPE_CHECKING:
    from ._djinn import Client, Tensor


@dataclass(frozen=True)
class Node:
    """The output of an earlier node of a Graph."""

    index: int


Input = Union["Tensor", Node]


@dataclass
class Graph:
    """Nodes of one Exec request, in order; each node's inputs are Tensors or earlier Nodes."""

    nodes: list[tuple[str, list, list[float], list[int]]] = field(default_factory=list)

    def op(self, name: str, *inputs: Input, f32: Sequence[float] = (), i64: Sequence[int] = ()) -> Node:
        """Adds op `name` (e.g. "matmul", "rms_norm") over `inputs`; `f32`/`i64` are its attributes."""
        ins = [i.index if isinstance(i, Node) else i for i in inputs]
        self.nodes.append((name, ins, list(f32), list(i64)))
        return Node(len(self.nodes) - 1)

    def run(self, client: "Client", *outputs: Node) -> list["Tensor"]:
        """Runs the graph on `client`'s server; returns one Tensor per node in `outputs`."""
        return client.run(self.nodes, [o.index for o in outputs])
