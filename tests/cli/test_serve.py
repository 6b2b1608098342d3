"""`lmkit serve` started for real on a free loopback port and talked to with the official `openai`
client (and raw HTTP for what a client library would not send): results equal `lmkit generate`'s,
alone or batched with 15 other clients; bad requests get their status and the server goes on; a
client that vanishes mid-stream frees its rows; SIGTERM lets a request in flight finish."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from lmkit import config, train
from lmkit.chat import ChatFormat
from lmkit.checkpoint import Checkpoint
from lmkit.config import SampleConfig
from lmkit.generate import generate, reply
from lmkit.project import Project

openai = pytest.importorskip("openai")
CPU = torch.device("cpu")


class Server:
    """`lmkit serve ARGS` on a free port, its log in LOG."""

    def __init__(self, log: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-m", "lmkit", "serve", "--port", str(self.port), *args],
                                        stdout=subprocess.DEVNULL, stderr=log.open("w"))
        deadline = time.monotonic() + 90
        while True:
            try:
                self.health = self.get("/health")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start: {log.read_text()}") from None
                time.sleep(0.2)
        self.model = self.health["model"]

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes | dict, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        """(status, JSON body, headers) of a POST, errors included."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()), dict(err.headers)

    def client(self, key: str = "none") -> object:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def served(tiny_project, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve") / "log", "-p", str(tiny_project.root), "--max-batch", "16")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def reference(tiny_project):
    ckpt = Checkpoint(tiny_project.latest_checkpoint())
    model, tokenizer = ckpt.model(), ckpt.tokenizer()
    return model, tokenizer, ChatFormat(tokenizer)


@pytest.fixture(scope="module")
def long_project(tmp_path_factory, tiny_project, small_corpus) -> Project:
    """A tiny GPT with a 512-token context (a few steps trained): long enough streams to interrupt."""
    import shutil

    project = Project.open(tmp_path_factory.mktemp("long_context"))
    shutil.copytree(tiny_project.tokenizer_dir, project.tokenizer_dir)
    cfg = config.resolve(flags={"arch": "gpt", "preset": "tiny", "tokenizer.vocab_size": 512,
                                "model.max_seq_len": 512, "train.max_steps": 2, "train.batch_size": 2,
                                "train.eval_interval": 2, "train.warmup_steps": 1})
    train.pretrain(project, [small_corpus], cfg)
    return project


def test_completions_chat_streaming_and_n_match_lmkit_generate(served, reference) -> None:
    model, tokenizer, form = reference
    client = served.client()
    assert [m.id for m in client.models.list().data] == [served.model]
    out = client.completions.create(model=served.model, prompt="Ham.\nTo be", max_tokens=8, temperature=0)
    alone = generate(model, tokenizer, "Ham.\nTo be", SampleConfig(greedy=True, max_new_tokens=8), CPU).samples[0]
    assert out.choices[0].text == alone.text and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens == len(alone.tokens)
    assert out.usage.prompt_tokens == len(tokenizer.encode_document("Ham.\nTo be"))

    seeded = client.completions.create(model=served.model, prompt="Hor.", max_tokens=10, seed=7, n=3,
                                       temperature=1.0, top_p=0.9)
    want = generate(model, tokenizer, "Hor.", SampleConfig(max_new_tokens=10, seed=7, num_samples=3, temperature=1.0,
                                                           top_p=0.9), CPU).samples
    assert [c.text for c in seeded.choices] == [s.text for s in want] and len({c.text for c in seeded.choices}) > 1

    messages = [{"role": "system", "content": "You are Horatio."}, {"role": "user", "content": "Who's there?"}]
    answer = client.chat.completions.create(model=served.model, messages=messages, max_tokens=6, temperature=0)
    expected = reply(model, form, messages, SampleConfig(greedy=True, max_new_tokens=6), CPU).samples[0]
    assert answer.choices[0].message.content == expected.text and answer.choices[0].message.role == "assistant"

    pieces, reasons = [], []
    for chunk in client.chat.completions.create(model=served.model, messages=messages, max_tokens=6, temperature=0,
                                                stream=True):
        pieces += [c.delta.content or "" for c in chunk.choices]
        reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
    assert "".join(pieces) == expected.text and len(reasons) == 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=served.model, prompt="Ham.\nTo be", max_tokens=8, temperature=0, stream=True))
    assert streamed == alone.text


def test_sixteen_concurrent_clients_get_what_each_would_alone(served, reference) -> None:
    model, tokenizer, _ = reference
    prompts = [f"{name}.\n" for name in ("Ham", "Hor", "Mar", "Ber", "Fran", "King", "Queen", "Pol")] * 2
    client = served.client()

    def ask(prompt: str) -> list[str]:
        return [client.completions.create(model=served.model, prompt=prompt, max_tokens=12, temperature=0,
                                          stop=["\n\n"] if k % 2 else None).choices[0].text for k in range(4)]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, got in zip(prompts, answers):
        plain = generate(model, tokenizer, prompt, SampleConfig(greedy=True, max_new_tokens=12), CPU).samples[0]
        cut = generate(model, tokenizer, prompt, SampleConfig(greedy=True, max_new_tokens=12, stop=("\n\n",)),
                       CPU).samples[0]
        assert got == [plain.text, cut.text] * 2


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "Ham.", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "Ham.", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "Ham.", "max_tokens": 10**6}, 400, "context"),
    ({"prompt": "Ham.", "max_tokens": 10**9}, 400, "max_new_tokens=1000000000 must be in [1, 16,777,216]"),
    ({"prompt": "Ham. " * 200, "max_tokens": 4}, 400, "context"),
    ({"prompt": "Ham.", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "Ham.", "n": 0}, 400, "n"),
    ({"prompt": "Ham.", "model": "gpt-4"}, 404, "does not exist"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
])
def test_bad_requests_get_their_status_and_the_server_goes_on(served, body, status, says) -> None:
    code, answer, _ = served.post("/v1/completions", body)
    assert code == status and says in answer["error"]["message"] and answer["error"]["type"]
    code, answer, _ = served.post("/v1/completions", {"prompt": "Ham.", "max_tokens": 2})
    assert code == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop")


def test_bad_chat_requests(served) -> None:
    for messages in ([], [{"role": "robot", "content": "hi"}], [{"role": "user"}], "hi"):
        code, answer, _ = served.post("/v1/chat/completions", {"messages": messages})
        assert code == 400 and "messages" in answer["error"]["message"], answer


def openai_error(answer: dict) -> dict:
    """ANSWER's error, once it is checked to be OpenAI's error object and nothing else."""
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    return answer["error"]


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, content_type, says, param", [
    (COMPLETIONS, {"prompt": "Ham.", "max_tokens": "5"}, None, "not a string", "max_tokens"),
    (COMPLETIONS, {"prompt": "Ham.", "max_tokens": True}, None, "not a boolean", "max_tokens"),
    (COMPLETIONS, {"prompt": "Ham.", "stream": "yes"}, None, "valid boolean", "stream"),
    (COMPLETIONS, {"prompt": "Ham.", "n": 2.0}, None, "valid integer", "n"),
    (COMPLETIONS, {"prompt": "Ham.", "seed": "7"}, None, "valid integer", "seed"),
    (COMPLETIONS, {"prompt": "Ham.", "logprobs": "yes"}, None, "valid integer", "logprobs"),
    (COMPLETIONS, {"prompt": "Ham.", "logprobs": 2}, None, "does not return logprobs", "logprobs"),
    (COMPLETIONS, {"prompt": ["Ham.", 5]}, None, "item 1 is an integer", "prompt"),
    (COMPLETIONS, {"prompt": "Ham.", "stop": 5}, None, "a list of strings", "stop"),
    (COMPLETIONS, {"prompt": "Ham.", "stop": ["\n", None]}, None, "item 1 is null", "stop"),
    (COMPLETIONS, b'{"prompt": "Ham.", "temperature": NaN}', None, "finite number", "temperature"),
    (COMPLETIONS, b'{"prompt": "Ham.", "top_p": Infinity}', None, "finite number", "top_p"),
    (COMPLETIONS, {"prompt": "Ham.", "temperature": True}, None, "valid number", "temperature"),
    (COMPLETIONS, b'["Ham."]', None, "must be a JSON object, not an array", None),
    (COMPLETIONS, b'"Ham."', None, "must be a JSON object, not a string", None),
    (COMPLETIONS, b'{"prompt": "Ham.\xff"}', None, "not UTF-8", None),
    (COMPLETIONS, b"", None, "empty", None),
    (COMPLETIONS, {"prompt": "Ham."}, "text/plain", "Content-Type: application/json", None),
    (CHAT, {"messages": "hi"}, None, "not a string", "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, None, "not an integer", "messages[0].content"),
    (CHAT, {"messages": HI, "logprobs": "yes"}, None, "valid boolean", "logprobs"),
])
def test_loose_or_malformed_bodies_get_400_in_openais_shape(served, path, body, content_type, says, param) -> None:
    headers = {"Content-Type": content_type} if content_type else None
    code, answer, _ = served.post(path, body, headers)
    error = openai_error(answer)
    assert code == 400 and says in error["message"] and error["param"] == param, answer
    assert error["type"] == "invalid_request_error"


def test_the_openai_client_gets_bad_request_for_loose_types(served) -> None:
    client = served.client()
    for field, value in (("max_tokens", "5"), ("max_tokens", True), ("stream", "yes")):
        with pytest.raises(openai.BadRequestError, match=field) as raised:
            client.completions.create(model=served.model, prompt="Ham.", **{"max_tokens": 2, field: value})
        assert raised.value.param == field and raised.value.type == "invalid_request_error"
    # whole numbers are numbers, as OpenAI takes them; a null stop is no stop
    out = client.completions.create(model=served.model, prompt="Ham.", max_tokens=2, temperature=1, top_p=1,
                                    stop=None, extra_body={"logprobs": None})
    assert out.choices[0].finish_reason in ("length", "stop")


def test_unknown_urls_and_wrong_methods_get_openais_shape(served) -> None:
    for method, path, status, says in (("GET", "/v1/engines", 404, "invalid URL (GET /v1/engines)"),
                                       ("GET", COMPLETIONS, 405, "only POST"),
                                       ("DELETE", "/v1/models", 405, "only GET")):
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(urllib.request.Request(served.url + path, method=method), timeout=30)
        error = openai_error(json.loads(raised.value.read()))
        assert raised.value.code == status and says in error["message"] and error["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="invalid URL"):
        served.client().get("/nowhere", cast_to=object)


def test_an_oversized_body_is_413_by_its_length_or_as_it_arrives(reference) -> None:
    """On the app in-process (TestClient) with a 100-byte limit: a body that declares its length is
    refused before it is read, one sent in chunks once it passes the limit."""
    from fastapi.testclient import TestClient

    from lmkit.batching import Engine
    from lmkit.server import Served, create_app

    model, tokenizer, _ = reference
    engine = Engine(model, tokenizer, CPU, max_batch=1)
    try:
        client = TestClient(create_app(Served(engine, None, "tiny", max_body=100)))
        big = json.dumps({"prompt": "Ham. " * 30, "max_tokens": 1}).encode()
        pieces = (big[k:k + 16] for k in range(0, len(big), 16))
        for content in (big, pieces):
            response = client.post(COMPLETIONS, content=content, headers={"Content-Type": "application/json"})
            error = openai_error(response.json())
            assert response.status_code == 413 and "larger than the server's limit of 100 bytes" in error["message"]
        small = client.post(COMPLETIONS, json={"prompt": "Ham.", "max_tokens": 1})
        assert small.status_code == 200, small.text
    finally:
        engine.close()


def test_a_vanished_client_frees_its_rows(long_project, tmp_path) -> None:
    server = Server(tmp_path / "log", "-p", str(long_project.root))
    try:
        request = urllib.request.Request(server.url + "/v1/completions", method="POST", headers={
            "Content-Type": "application/json"}, data=json.dumps({"prompt": "Ham.", "max_tokens": 500,
                                                                  "stream": True, "temperature": 0}).encode())
        response = urllib.request.urlopen(request, timeout=30)
        assert response.readline().startswith(b"data: ")  # streaming has begun
        response.close()  # the client goes away mid-stream
        other = server.client().completions.create(model=server.model, prompt="Hor.", max_tokens=5, temperature=0)
        assert other.choices[0].text is not None
        deadline = time.monotonic() + 20
        while server.get("/health")["busy"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.get("/health")["busy"] == 0  # its rows left the batch
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_the_request_in_flight(long_project, tmp_path) -> None:
    server = Server(tmp_path / "log", "-p", str(long_project.root))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.post, "/v1/completions", {"prompt": "Ham.", "max_tokens": 400, "temperature": 0})
        deadline = time.monotonic() + 20
        while not server.get("/health")["busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        code, answer, _ = future.result(timeout=60)
    assert code == 200 and answer["usage"]["completion_tokens"] >= 1
    assert server.process.wait(timeout=60) == 0
    assert "Shutting down" in server.log.read_text()


def test_api_key_and_a_full_queue(long_project, tmp_path) -> None:
    server = Server(tmp_path / "log", "-p", str(long_project.root), "--max-batch", "1", "--max-queue", "1",
                    "--api-key", "sesame")
    try:
        code, answer, _ = server.post("/v1/completions", {"prompt": "Ham.", "max_tokens": 2})
        assert code == 401 and answer["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").completions.create(model=server.model, prompt="Ham.", max_tokens=2)
        key = {"Authorization": "Bearer sesame"}
        assert server.post("/v1/completions", {"prompt": "Ham.", "max_tokens": 2}, key)[0] == 200
        body = {"prompt": "Ham.", "max_tokens": 300, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: server.post("/v1/completions", body, key), range(6)))
        codes = sorted(code for code, _, _ in results)
        assert 200 in codes and 429 in codes  # one decoding, one waiting, the rest turned away at once
        refused = next(headers for code, _, headers in results if code == 429)
        assert int(refused["retry-after"]) >= 1
    finally:
        assert server.stop() == 0
    assert "429" in server.log.read_text()  # the access log is on stderr


def test_serve_errors(tmp_path, tiny_project, tiny_bert_project, served) -> None:
    from tests.cli.conftest import assert_user_error, lmkit

    assert_user_error(lmkit("serve", "-p", tiny_bert_project.root), "serves a decoder")
    assert_user_error(lmkit("serve", "-p", tmp_path), "no checkpoint")
    assert_user_error(lmkit("serve", "-p", tiny_project.root, "--port", str(served.port)), "cannot listen")
