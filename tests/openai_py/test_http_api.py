"""The OpenAI-compatible HTTP front driven by the official `openai` package, against a real
`djinn-dataplane serve` process serving SmolLM2 bf16:

- streamed and non-streamed chat and completions give the same greedy text as
  `djinn-dataplane generate [--chat]` over the binary protocol;
- a `session_id` conversation over three turns gives the same text as the same turns on one
  binary-protocol session (`djinn-dataplane chat`);
- an unknown model, malformed JSON, a too long prompt and a wrong token get 404, 400,
  400 `context_length_exceeded` and 401.

DJINN_BIN names the binary (default target/debug/djinn-dataplane). Skipped, with the reason, when
models/smollm2-bf16 has not been fetched.
"""

import json
import os
import pathlib
import subprocess
import tempfile
import urllib.error
import urllib.request

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("DJINN_BIN", str(ROOT / "target" / "debug" / "djinn-dataplane"))
MODEL_DIR = ROOT / "models" / "smollm2-bf16"
TOKEN = "tok-py"

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").exists(),
    reason="models/smollm2-bf16 not fetched (scripts/fetch_smollm2.sh models/smollm2-bf16 bf16)",
)


@pytest.fixture(scope="module")
def server():
    tokens = tempfile.NamedTemporaryFile("w", suffix=".tokens", delete=False)
    tokens.write(f"py {TOKEN}\n")
    tokens.close()
    args = [BIN, "serve", "--listen", "tcp://127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--gpus", "cpu",
            "--model", f"smollm2={MODEL_DIR}", "--auth-token-file", tokens.name, "--max-context-tokens", "256"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = api = None
    while url is None or api is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited: {proc.wait()}")
        if line.startswith("listening "):
            url = line.split()[1]
        elif line.startswith("http-api http://"):
            api = line.split("http://")[1].strip()
    env = dict(os.environ, DJINN_TOKEN=TOKEN)
    yield {"url": url, "api": api, "env": env}
    proc.terminate()
    proc.wait(timeout=20)
    os.unlink(tokens.name)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"http://{server['api']}/v1", api_key=TOKEN)


def generate(server, prompt, chat, n):
    args = [BIN, "generate", "--server", server["url"], "--model", "smollm2", "--prompt", prompt,
            "--max-new-tokens", str(n), "--json"] + (["--chat"] if chat else [])
    out = subprocess.run(args, env=server["env"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["text"]


QUESTIONS = ["What is the capital of France?", "Name three fruits."]


@pytest.mark.parametrize("question", QUESTIONS)
def test_chat_same_text_as_generate(server, client, question):
    want = generate(server, question, True, 24)
    msgs = [{"role": "user", "content": question}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want
    assert r.usage.completion_tokens > 0
    parts = []
    for chunk in client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == want


def test_completion_same_text_as_generate(server, client):
    prompt = "The three primary colors are"
    want = generate(server, prompt, False, 16)
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stream=True) if c.choices)
    assert streamed == want


def test_session_three_turns_same_as_binary_session(server, client):
    turns = ["Hi, my name is Ann.", "What is my name?", "Say it again, in capitals."]
    # The same turns on one binary-protocol session: `chat` prints each reply and a newline.
    out = subprocess.run([BIN, "chat", "--server", server["url"], "--model", "smollm2", "--temperature", "0",
                          "--max-new-tokens", "20"], input="\n".join(turns) + "\n", env=server["env"],
                         capture_output=True, text=True, check=True).stdout
    got = []
    session = "new"
    for i, t in enumerate(turns):
        msgs = [{"role": "user", "content": t}]
        if i == 1:
            text = ""
            for chunk in client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=20,
                                                        temperature=0, stream=True,
                                                        extra_body={"session_id": session}):
                assert chunk.model_extra["session_id"] == session
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
        else:
            r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=20, temperature=0,
                                               extra_body={"session_id": session})
            session = r.model_extra["session_id"]
            text = r.choices[0].message.content
        got.append(text)
    assert "\n".join(got) + "\n" == out


def test_error_codes(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", max_tokens=4,
                                       messages=[{"role": "user", "content": "word " * 300}])
    assert e.value.code == "context_length_exceeded"
    wrong = openai.OpenAI(base_url=f"http://{server['api']}/v1", api_key="not-a-token")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    # Malformed JSON (the openai package only sends valid JSON).
    req = urllib.request.Request(f"http://{server['api']}/v1/chat/completions", data=b"{\"model\": ",
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    assert json.loads(e.value.read())["error"]["type"] == "invalid_request_error"
    assert [m.id for m in client.models.list()] == ["smollm2"]
