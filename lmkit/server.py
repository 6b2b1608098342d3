"""`lmkit serve`: OpenAI's HTTP API (completions, chat completions, models) in front of one
checkpoint, on FastAPI. Requests become lmkit.batching jobs, so those in flight decode together.

Errors are OpenAI's error object with its status: 400 for a bad request (a body that is not UTF-8
JSON or not an object, a field of the wrong type, a value out of range, a prompt that does not fit
the context), 401 without the API key, 404 for another model or an unknown URL, 405 for the wrong
method, 413 for a body over Served.max_body, 429 (with Retry-After) when the waiting line is full.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, PlainValidator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG

from lmkit.batching import Engine, Job, QueueFull
from lmkit.chat import ChatFormat, check_messages, load_template
from lmkit.checkpoint import Checkpoint, resolve
from lmkit.config import ConfigError, SampleConfig, check_range
from lmkit.device import pick_device
from lmkit.errors import CheckpointError, DataError, LmkitError
from lmkit.generate import load_for_generation, require_decoder
from lmkit.project import Project

MAX_N = 16
MAX_BODY = 16 * 2**20  # bytes of a request; a 4096-token prompt needs well under 1 MiB


def _strings(value: Any) -> str | list[str]:
    """A string or a list of strings, as `prompt` and `stop` take them (token ids are not accepted)."""
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    if isinstance(value, list):
        k, item = next((k, v) for k, v in enumerate(value) if not isinstance(v, str))
        raise ValueError(f"must be a string or a list of strings; item {k} is {_json_type(item)}")
    raise ValueError(f"must be a string or a list of strings, not {_json_type(value)}")


Strings = Annotated[str | list[str], PlainValidator(_strings)]


class _Request(BaseModel):
    """The fields both endpoints share, as OpenAI defines them; others a client sends are ignored.
    Strict, as OpenAI is: "5" is not an integer, nor true a number, nor "yes" a boolean (a whole
    number is still a float), and NaN or Infinity is no temperature."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stop: Strings | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


class CompletionRequest(_Request):
    prompt: Strings
    logprobs: int | None = Field(default=None, ge=0, le=5)  # not returned: a request for them is refused


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None  # not returned: a request for them is refused


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: the one shape of every error this server sends, streamed ones too."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, kind, param), status_code=status, headers=headers)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null", bytes: "raw bytes"}
    return names.get(type(value), type(value).__name__)


def _invalid(err: RequestValidationError, content_type: str | None) -> tuple[str, str | None]:
    """(message, param) for the first thing wrong with a request's body."""
    first = err.errors()[0] if err.errors() else {}
    kind, loc = first.get("type", ""), [p for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    if not loc:  # the body as a whole
        if kind == "missing":
            return "the body is empty; send a JSON object", None
        if isinstance(err.body, bytes):  # not parsed: it was not sent as JSON
            return f"send the body as JSON with Content-Type: application/json (not {content_type or 'none'})", None
        return f"the body must be a JSON object, not {_json_type(err.body)}", None
    where = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    message = first.get("msg", "invalid").removeprefix("Value error, ")
    if kind.endswith("_type"):
        message += f", not {_json_type(first.get('input'))}"
    return f"{where}: {message}", where


def _http_message(request: Request, err: HTTPException) -> str:
    """What an HTTPException (routing's 404 and 405, FastAPI's unreadable body, a body too large) says."""
    if err.status_code == 404:
        return f"invalid URL ({request.method} {request.url.path})"
    if err.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path} (only {(err.headers or {}).get('Allow', '')})"
    if isinstance(err.__cause__, UnicodeDecodeError):
        return f"the body is not UTF-8 ({err.__cause__.reason} at byte {err.__cause__.start})"
    return str(err.detail)


class _BodyLimit:
    """413 for a request body over LIMIT bytes: at once by its Content-Length, or as it arrives."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the body is larger than the server's limit of {self.limit:,} bytes"
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await _error(413, too_large)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, too_large)  # FastAPI passes it on to the handler below
            return message

        await self.app(scope, counted, send)


def check_settings(*, max_batch: int, max_queue: int, max_context: int, max_tokens: int,
                   shutdown_timeout: float) -> None:
    """The server's own settings (`lmkit serve`'s flags), checked before a model loads.

    Raises:
        ConfigError: one is out of its range (named as its flag is spelled).
    """
    check_range("max_batch", max_batch, 1, 4096)
    check_range("max_queue", max_queue, 0, 1 << 20)
    check_range("max_context", max_context, 8, 1 << 24)
    check_range("max_tokens", max_tokens, 1, 1 << 24)
    check_range("shutdown_timeout", shutdown_timeout, 0, 24 * 3600)


@dataclass
class Served:
    """What the app serves: the engine, the tokenizer's chat format (None: no template), the
    model's name, the default max_tokens, the API key (None: open), and the largest body in bytes."""

    engine: Engine
    chat: ChatFormat | None
    name: str
    default_max_tokens: int = 256
    api_key: str | None = None
    retry_after: int = 1
    max_body: int = MAX_BODY
    source: str = ""  # the checkpoint folder, for the log


def load_served(project: Path | str | None = None, checkpoint_path: Path | None = None, *, host: str = "127.0.0.1",
                port: int = 8000, device: str = "auto", max_batch: int = 8, max_queue: int = 64,
                max_context: int = 4096, max_tokens: int = 256, shutdown_timeout: float = 30.0,
                api_key: str | None = None, model_name: str | None = None, chat_template: Path | None = None,
                quantize: str | None = None, log: Callable[[str], None] = lambda _: None) -> Served:
    """What `lmkit serve` serves, checked and loaded before it listens: the settings (check_settings),
    the checkpoint CHECKPOINT_PATH means in PROJECT (a decoder), HOST:PORT free to listen on, the
    model on DEVICE with its engine, and its chat format (none without a chat template: then only
    completions are served). MODEL_NAME defaults to project/run/checkpoint.

    Raises:
        ConfigError: a setting out of its range.
        DataError: the checkpoint is no decoder, or HOST:PORT cannot be listened on.
        CheckpointError: no such checkpoint, or a damaged one; a --chat-template that does not parse.
    """
    check_settings(max_batch=max_batch, max_queue=max_queue, max_context=max_context, max_tokens=max_tokens,
                   shutdown_timeout=shutdown_timeout)
    home = Project.open(project, create=False)
    ckpt = Checkpoint(resolve(checkpoint_path, home))
    require_decoder(ckpt, "lmkit serve serves a decoder")
    check_port(host, port)
    where = pick_device(device)
    model, tokenizer = load_for_generation(ckpt, where, quantize)
    if quantize or ckpt.is_int8:
        log("int8: rows decoded together share activation scales, so a request's text may differ "
            "slightly from the same request alone")
    template = load_template(chat_template) if chat_template else None
    try:
        form: ChatFormat | None = ChatFormat(tokenizer, template)
    except CheckpointError:
        form = None  # completions only
        log("this checkpoint has no chat template: /v1/chat/completions answers 400")
    engine = Engine(model, tokenizer, where, max_batch=max_batch, max_queue=max_queue, max_context=max_context)
    return Served(engine, form, model_name or served_name(ckpt.path, home), max_tokens, api_key,
                  source=str(ckpt.path))


def run(served: Served, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
        quiet: bool = False, log: Callable[[str], None] = lambda _: None) -> None:
    """Serve SERVED on HOST:PORT until SIGTERM or Ctrl-C, letting requests in flight finish for up to
    SHUTDOWN_TIMEOUT seconds; uvicorn's log (on stderr) says only warnings when QUIET."""
    log(f"serving {served.name} ({served.source}) on http://{host}:{port}/v1 with up to {served.engine.max_batch} "
        "rows a step" + (", API key required" if served.api_key else ""))
    # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler it found: a
    # quiet one, so that a finished shutdown exits 0 (Ctrl-C still ends in KeyboardInterrupt: 130).
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(create_app(served), host=host, port=port, log_config=log_config(quiet),
                    timeout_graceful_shutdown=shutdown_timeout)
    finally:
        served.engine.close()


def served_name(path: Path, project: Project) -> str:
    """The model's name in the API: project/run/checkpoint, or the folder's name for a checkpoint
    outside PROJECT."""
    try:
        relative = path.resolve().relative_to(project.checkpoints_dir.resolve()).as_posix()
    except ValueError:
        return path.resolve().name
    return f"{project.root.resolve().name}/{relative}"


def check_port(host: str, port: int) -> None:
    """A port out of range or already taken is a one-line error before the model loads (uvicorn would
    log and exit 1).

    Raises:
        ConfigError: PORT is out of 0..65535.
        DataError: HOST:PORT cannot be listened on.
    """
    check_range("port", port, 0, 65535)
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise DataError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def log_config(quiet: bool) -> dict[str, Any]:
    """uvicorn's logging, with the access log on stderr too (stdout is for data)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    for logger in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        config["loggers"].setdefault(logger, {})["level"] = "WARNING" if quiet else "INFO"
    return config


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="lmkit", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = served.engine.tokenizer
    # inside authorize (added later, so outside it): the route reads the body through this, and
    # authorize's task group would wrap the 413 raised while reading in an ExceptionGroup
    app.add_middleware(_BodyLimit, limit=served.max_body)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _invalid(err, request.headers.get("content-type"))
        return _error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return _error(err.status_code, _http_message(request, err), kind, headers=err.headers)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.kind, err.param, err.headers)

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        if served.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
                return _error(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.name, "busy": served.engine.busy}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "lmkit"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if body.logprobs is not None:
            raise ApiError(400, "this server does not return logprobs", param="logprobs")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request (send several requests: they are batched together)",
                           param="prompt")
        return await _answer(request, body, tokenizer.encode_document(prompts[0]), tokenizer.stop_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        if served.chat is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        if body.logprobs:
            raise ApiError(400, "this server does not return logprobs", param="logprobs")
        try:
            messages = check_messages([m.model_dump() for m in body.messages], "messages", needs_assistant=False)
            prompt_ids = served.chat.prompt(messages)
        except LmkitError as err:
            raise ApiError(400, str(err), param="messages") from None
        return await _answer(request, body, prompt_ids, served.chat.stop_ids, chat=True)

    async def _answer(request: Request, body: _Request, prompt_ids: list[int], stop_ids: list[int],
                      chat: bool) -> Any:
        if body.model and body.model != served.name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {served.name!r}",
                           param="model")
        if len(prompt_ids) >= served.engine.context:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the context is "
                           f"{served.engine.context}", param="messages" if chat else "prompt")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            cfg = SampleConfig(max_new_tokens=body.max_tokens or min(served.default_max_tokens,
                                                                      served.engine.context - len(prompt_ids)),
                               temperature=body.temperature, top_p=body.top_p, num_samples=body.n, seed=body.seed,
                               stop=tuple(s for s in stop if s))
        except ConfigError as err:
            raise ApiError(400, str(err)) from None
        call = _Call(asyncio.get_running_loop())
        job = Job(prompt_ids, cfg, stop_ids, on_done=call.done, on_text=call.text if body.stream else None,
                  on_error=call.error)
        try:
            served.engine.submit(job)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy ({err}); retry shortly", "rate_limit_error",
                           headers={"Retry-After": str(served.retry_after)}) from None
        except ValueError as err:
            raise ApiError(400, str(err), param="max_tokens" if "max_tokens" in str(err) else "n") from None
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
                "model": served.name}
        if body.stream:
            return StreamingResponse(_stream(request, call, job, meta, chat, body.n), media_type="text/event-stream")
        try:
            samples, seed = await call.result()
        except asyncio.CancelledError:
            job.cancel()
            raise
        choices = [{"index": i, "finish_reason": _finish(s.finish_reason), "logprobs": None,
                    **({"message": {"role": "assistant", "content": s.text}} if chat else {"text": s.text})}
                   for i, s in enumerate(samples)]
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "system_fingerprint": f"seed-{seed}", "usage": _usage(prompt_ids, samples)}

    return app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # an end-of-text token or a stop string


def _usage(prompt_ids: list[int], samples: list[Any]) -> dict[str, int]:
    completion = sum(len(s.tokens) for s in samples)
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
            "total_tokens": len(prompt_ids) + completion}


class _Call:
    """A job's results, handed from the engine's thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def _put(self, event: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def text(self, row: int, piece: str) -> None:
        self._put(("text", (row, piece)))

    def done(self, samples: list[Any], seed: int) -> None:
        self._put(("done", (samples, seed)))

    def error(self, message: str) -> None:
        self._put(("error", message))

    async def result(self) -> tuple[list[Any], int]:
        while True:
            kind, value = await self.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise ApiError(500, f"decoding failed: {value}", "server_error")


async def _stream(request: Request, call: _Call, job: Job, meta: dict[str, Any], chat: bool,
                  n: int) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client that goes
    away cancels the job: its rows leave the batch at the next step."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, piece: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if piece is not None:
                delta["content"] = piece
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": piece or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

    try:
        if chat:
            for i in range(n):
                yield chunk(i, "", None, first=True)
        while True:
            try:
                event, value = await asyncio.wait_for(call.events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return
                continue
            if event == "text":
                yield chunk(value[0], value[1], None)
            elif event == "error":
                yield f"data: {json.dumps(_error_body(f'decoding failed: {value}', 'server_error'))}\n\n"
                return
            else:
                samples, _ = value
                for i, sample in enumerate(samples):
                    yield chunk(i, None if chat else "", _finish(sample.finish_reason))
                yield "data: [DONE]\n\n"
                return
    except asyncio.CancelledError:  # the client went away mid-stream
        job.cancel()
        raise
