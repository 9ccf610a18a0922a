"""The GIL is released while a call waits on the server: another Python thread runs meanwhile."""

from __future__ import annotations

import os
import signal
import threading
import time

import djinn


def test_gil_released_while_waiting(own_server):
    """The server is stopped (SIGSTOP) so that generate() must wait; a counting thread keeps
    running during the wait, then the server resumes and generate() completes."""
    c = djinn.connect(own_server.url)
    s = c.open_session("tiny")
    result: dict = {}
    started = threading.Event()

    def gen() -> None:
        started.set()
        result["g"] = s.generate([9, 14, 61], max_new_tokens=4, ignore_eos=True)

    os.kill(own_server.pid, signal.SIGSTOP)
    try:
        t = threading.Thread(target=gen)
        t.start()
        started.wait()
        time.sleep(0.05)  # generate() is now blocked on the stopped server
        assert t.is_alive()
        count, end = 0, time.monotonic() + 0.3
        while time.monotonic() < end:
            count += 1
        assert count > 10_000, f"the main thread ran only {count} iterations while generate() waited"
        assert t.is_alive(), "generate() returned while the server was stopped"
    finally:
        os.kill(own_server.pid, signal.SIGCONT)
    t.join(timeout=30)
    assert not t.is_alive() and len(result["g"].token_ids) == 4
    c.close()


def test_calls_from_threads_queue_on_one_connection(client):
    """Several threads share one connection: calls queue (none interleaves another's frames)."""
    with client.open_session("tiny") as s0:
        want = s0.generate([9, 14, 61], max_new_tokens=6, ignore_eos=True).token_ids
    out: list = []

    def work() -> None:
        with client.open_session("tiny") as s:
            out.append(s.generate([9, 14, 61], max_new_tokens=6, ignore_eos=True).token_ids)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out == [want] * 4
