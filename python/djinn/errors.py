"""Exceptions raised by the djinn client.

Every error is a :class:`DjinnError`. When the server refused a request, ``status`` is the
server's status name (``"UnknownModel"``, ``"Busy"``, ...), ``code`` its number on the wire and
``opcode`` the request it answered; errors raised on the client side carry ``status = None``.
The most common statuses have a subclass of their own (see ``STATUS_CLASSES``); any other status
is raised as a plain :class:`DjinnError` with ``status`` set.
"""

from __future__ import annotations


class DjinnError(Exception):
    """Base class of every djinn error."""

    status: str | None
    code: int | None
    opcode: str | None

    def __init__(self, message: str, status: str | None = None, code: int | None = None, opcode: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.opcode = opcode


class ConnectError(DjinnError):
    """Nothing answered at the URL, or the handshake failed (bad URL, no server, wrong version)."""


class TransportError(DjinnError):
    """The connection failed after it was established (server gone, connection reset)."""


class ProtocolError(DjinnError):
    """A reply could not be understood (client and server disagree on the wire format)."""


class ClientBusyError(DjinnError):
    """The connection is reading a token stream: finish or close() it first, or use another connection."""


class ClosedError(DjinnError):
    """The client, session or tensor was already closed."""


class UnauthorizedError(DjinnError):
    """Server status Unauthorized: the token is missing or not accepted."""


class UnknownModelError(DjinnError, LookupError):
    """Server status UnknownModel: the server does not serve a model of that name (see models())."""


class UnknownSessionError(DjinnError, LookupError):
    """Server status UnknownSession: closed, expired, or another tenant's session."""


class BadHandleError(DjinnError, LookupError):
    """Server status BadHandle: the tensor was freed, never existed, or is another tenant's."""


class InvalidArgumentError(DjinnError, ValueError):
    """Server status BadArgument, ShapeMismatch or DTypeMismatch, or an argument the client refuses."""


class BusyError(DjinnError):
    """Server status Busy: a bounded queue is full; retry later."""


class LimitExceededError(DjinnError):
    """Server status LimitExceeded: a per-tenant limit (sessions, handles, graph nodes) was reached."""


class OutOfMemoryError(DjinnError):
    """Server status OutOfMemory: the server could not place the tensor or the session's KV cache."""


class UnsupportedError(DjinnError):
    """Server status Unsupported: the server or its backend does not implement this operation."""


class ShuttingDownError(DjinnError):
    """Server status ShuttingDown: the server is draining; connect to another one."""


class CancelledError(DjinnError):
    """Server status Cancelled: the request was cancelled."""


# Server status name → exception class (statuses not listed raise DjinnError).
STATUS_CLASSES: dict[str, type[DjinnError]] = {
    "Unauthorized": UnauthorizedError,
    "UnknownModel": UnknownModelError,
    "UnknownSession": UnknownSessionError,
    "BadHandle": BadHandleError,
    "BadArgument": InvalidArgumentError,
    "ShapeMismatch": InvalidArgumentError,
    "DTypeMismatch": InvalidArgumentError,
    "Busy": BusyError,
    "LimitExceeded": LimitExceededError,
    "OutOfMemory": OutOfMemoryError,
    "Unsupported": UnsupportedError,
    "ShuttingDown": ShuttingDownError,
    "Cancelled": CancelledError,
}

_KINDS: dict[str, type[DjinnError]] = {
    "connect": ConnectError,
    "transport": TransportError,
    "protocol": ProtocolError,
    "busy": ClientBusyError,
    "closed": ClosedError,
    "argument": InvalidArgumentError,
    "client": DjinnError,
}


def _make(kind: str, message: str, status: str | None, code: int | None, opcode: str | None) -> DjinnError:
    """The exception for an error of the extension (`kind` "server" picks the class by status)."""
    cls = STATUS_CLASSES.get(status or "", DjinnError) if kind == "server" else _KINDS.get(kind, DjinnError)
    return cls(message, status, code, opcode)


__all__ = [
    "DjinnError",
    "ConnectError",
    "TransportError",
    "ProtocolError",
    "ClientBusyError",
    "ClosedError",
    "UnauthorizedError",
    "UnknownModelError",
    "UnknownSessionError",
    "BadHandleError",
    "InvalidArgumentError",
    "BusyError",
    "LimitExceededError",
    "OutOfMemoryError",
    "UnsupportedError",
    "ShuttingDownError",
    "CancelledError",
    "STATUS_CLASSES",
]
