"""The HTTP app: OpenAI-compatible routes over one ServedModel, the web chat page, /health and /metrics.

Each generation request is parsed and checked here (limits.py, schemas.py), handed to the shared scheduler,
and answered from an asyncio queue the scheduler's thread feeds (`call_soon_threadsafe`): as one JSON body,
or as server-sent events in OpenAI's chunk format ending with `data: [DONE]`. When a streaming client goes
away, Starlette cancels the response generator, and its `finally` cancels the request, which frees its row at
the scheduler's next chunk boundary.

Every route but /health (and the static page, which holds nothing and asks for the key itself) needs the API
key as a bearer token when the server has one. Every refusal is an OpenAI-style JSON error; an unexpected
failure is logged with its traceback and answered 500 with a plain message, never the traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ghostvis_core.log import get_logger
from ghostvis_core.serving.limits import ApiError
from ghostvis_core.serving.metrics import RequestRecord, ServerMetrics
from ghostvis_core.serving.schemas import ChatCompletionRequest, CompletionRequest
from ghostvis_core.serving.service import ServedModel

DISCONNECT_POLL_S = 0.5
"""How often a non-streaming request checks whether its client is still there."""


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {where!r}: this server does not take it", param=where,
                        code="unknown_field")  # fmt: skip
    return ApiError(400, f"{where}: {first['msg']}", param=where or None, code="invalid_value")


def create_app(service: ServedModel, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `service` (whose scheduler the app starts and stops with its lifespan)."""
    from contextlib import asynccontextmanager

    limits = service.limits
    metrics = ServerMetrics(service.scheduler)

    @asynccontextmanager
    async def lifespan(_app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="GhostVis", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):  # a refused request: its access-log line, then the error
        metrics.record(RequestRecord("refused-" + uuid.uuid4().hex[:12], request.url.path, err.status,
                                     finish_reason=err.code))  # fmt: skip
        return _error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, err: HTTPException):
        return _error_response(ApiError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404
                                        else None))  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(_request, err: Exception):
        get_logger().error(f"internal error: {type(err).__name__}: {err}", exc_info=err)
        return _error_response(ApiError(500, f"internal server error ({type(err).__name__}); see the server log"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def read_json(request: Request, model):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise _too_large(limits.max_body_bytes)
        try:
            body = await request.body()
        except ClientDisconnect:
            raise ApiError(400, "the client went away before sending the whole body") from None
        if len(body) > limits.max_body_bytes:  # a chunked body declares no length
            raise _too_large(limits.max_body_bytes)
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
        try:
            return model.model_validate(obj)
        except ValidationError as e:
            raise _validation_error(e) from None

    def take_slot() -> None:
        if metrics.in_flight >= limits.max_concurrent:
            raise ApiError(429, f"the server is at its limit of {limits.max_concurrent} concurrent requests "
                           "(--max-concurrent): retry shortly", type="rate_limit_error", code="too_many_requests",
                           headers={"Retry-After": "1"})  # fmt: skip
        metrics.in_flight += 1

    @app.get("/", include_in_schema=False)
    async def page():
        html = resources.files("ghostvis_core.serving").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [service.describe()]}

    @app.get("/metrics")
    async def get_metrics(request: Request):
        authorize(request)
        return metrics.snapshot()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, CompletionRequest, "text")

    async def _generate(request: Request, schema, kind: str):
        authorize(request)
        t0 = time.perf_counter()
        req = await read_json(request, schema)
        if kind == "chat":
            prepared, max_tokens = service.chat_prompt(req), req.max_completion_tokens or req.max_tokens
        else:
            prepared, max_tokens = service.completion_prompt(req), req.max_tokens
        if req.model is not None and req.model != service.name:
            raise ApiError(404, f"model {req.model!r} is not served here (this server serves {service.name!r})",
                           param="model", code="model_not_found")  # fmt: skip
        budget = service.budget(len(prepared.ids), max_tokens)
        sampling = service.sampling(req)
        take_slot()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        record = RequestRecord(rid, request.url.path, 200, prompt_tokens=len(prepared.ids), stream=req.stream)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handle = {}

        def put(item) -> None:  # called from the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop has closed (shutdown): nobody will read this request
                handle["request"].cancel()

        # Only what the response shows crosses to the event loop, each a wake-up of it from the scheduler's
        # thread: a stream carries text (token ids without a tokenizer); a whole response needs only the end.
        text = service.tokenizer is not None
        on_text = (lambda t: put(("text", t))) if req.stream and text else None
        on_tokens = (lambda ids: put(("tokens", ids))) if req.stream and not text else None
        try:
            handle["request"] = service.submit(
                prepared, sampling, budget, on_text=on_text, on_tokens=on_tokens,
                on_finish=lambda c: put(("done", c)), on_error=lambda e: put(("error", e)),
            )  # fmt: skip
        except BaseException:
            metrics.in_flight -= 1
            raise
        chunks = _Chunks(rid, kind, service.name, text=text)

        def close(completion) -> None:
            metrics.in_flight -= 1
            record.total_s = time.perf_counter() - t0
            if completion is not None:
                r = handle["request"]
                record.completion_tokens = len(completion.token_ids)
                record.finish_reason = completion.finish_reason
                record.ttft_s = r.t_submit + completion.queued_s + completion.ttft_s - t0
            metrics.record(record)

        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_stream(events, chunks, handle, record, close, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        completion = None
        try:
            while True:
                try:
                    what, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle["request"].cancel()
                    continue
                if what == "error":
                    record.status = 500
                    raise ApiError(500, f"generation failed ({type(value).__name__}); see the server log")
                if what == "done":
                    completion = value
                    break
        finally:
            if completion is None:
                handle["request"].cancel()
            close(completion)
        return chunks.whole(completion)

    return app


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {limit} bytes (--max-body-bytes)",
                    code="body_too_large")  # fmt: skip


def _usage(completion) -> dict:
    n_out = len(completion.token_ids)
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": n_out,
            "total_tokens": completion.prompt_tokens + n_out}  # fmt: skip


class _Chunks:
    """OpenAI response bodies of one request: chat or text completion, whole or as stream chunks."""

    def __init__(self, rid: str, kind: str, model: str, text: bool):
        self.rid, self.kind, self.model, self.text = rid, kind, model, text
        self.created = int(time.time())

    def _body(self, obj: str, choice: dict, **extra) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                **extra}

    def chunk(self, text: str | None = None, token_ids=None, finish_reason=None, role: bool = False, usage=None):
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        if token_ids is not None:
            choice["token_ids"] = token_ids
        body = self._body(obj, choice, **({"usage": usage} if usage else {}))
        return f"data: {json.dumps(body)}\n\n"

    def whole(self, c) -> dict:
        text = c.text if c.text is not None else ""
        extra = {} if self.text else {"token_ids": c.token_ids}
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": c.finish_reason, **extra}  # fmt: skip
            return self._body("chat.completion", choice, usage=_usage(c))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": c.finish_reason, **extra}
        return self._body("text_completion", choice, usage=_usage(c))


async def _stream(events: asyncio.Queue, chunks: _Chunks, handle: dict, record: RequestRecord, close,
                  include_usage: bool):  # fmt: skip
    completion = None
    try:
        if chunks.kind == "chat":
            yield chunks.chunk(role=True)
        while True:
            what, value = await events.get()
            if what == "text":
                yield chunks.chunk(value)
            elif what == "tokens":  # without a tokenizer the stream carries token ids
                yield chunks.chunk("", token_ids=value)
            elif what == "error":
                record.status = 500
                err = ApiError(500, f"generation failed ({type(value).__name__}); see the server log")
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            else:
                completion = value
                yield chunks.chunk(finish_reason=completion.finish_reason, usage=_usage(completion))
                if include_usage:
                    body = {**json.loads(chunks.chunk()[6:]), "choices": [], "usage": _usage(completion)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                break
    finally:  # also on a client that went away (the generator is cancelled): free the row now
        if completion is None:
            handle["request"].cancel()
            record.status = record.status if record.status != 200 else 499
        close(completion)
