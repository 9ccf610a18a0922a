"""The README's Python examples run as written, against a test server (its URL and the tiny
model substituted for the README's)."""

from __future__ import annotations

import re

import pytest

from conftest import REPO


def block(name: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- {name}:begin -->\n```python\n(.*?)```\n<!-- {name}:end -->", text, re.S)
    assert m, f"README has no {name} block"
    return m.group(1)


@pytest.mark.parametrize("name", ["py-chat", "py-tensor"])
def test_readme_example_runs(name, server, capsys):
    code = block(name).replace("tcp://127.0.0.1:7070", server.url).replace('"smollm2"', '"tiny"')
    exec(compile(code, f"README:{name}", "exec"), {})
    if name == "py-chat":
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 3 and out[2].split()[0] in ("eos", "length", "stop")
