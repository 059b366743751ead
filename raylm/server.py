"""The Serve app: a `Gateway` ingress (FastAPI, OpenAI-compatible routes) in front of `LLM`
model replicas reached through a DeploymentHandle.

The gateway checks the key, the route, the body and the model name, so every client mistake is a
4xx OpenAI-style JSON error raised before any model work; the model replicas tokenize, check
limits, batch non-streaming requests with `serve.batch` and generate text (causal LM) or label
texts (`/v1/classify`) and words (`/v1/ner`) for the classifier tasks. Keeping HTTP off the model
replicas is what lets a request survive one of them dying: the gateway retries a request whose
replica died once on another, and answers 503 (with Retry-After) rather than 500 if that fails too.
"""
# No `from __future__ import annotations` here: FastAPI reads route annotations at runtime and
# Serve's ingress wrapper hides the module globals it would need to resolve strings.

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from raylm.api import (
    TASK_ROUTES,
    APIError,
    ChatRequest,
    CompletionRequest,
    LabelRequest,
    chat_body,
    chunk,
    classify_body,
    completion_body,
    ner_body,
    new_id,
    parse_body,
    sse,
)
from raylm.checkpoint import task_of
from raylm.inference import Completion, Engine, Sampling
from raylm.predict import Entity, Label, Predictor

logger = logging.getLogger("ray.serve")
app = FastAPI(title="raylm", docs_url=None, redoc_url=None, openapi_url=None)
# A model replica that died with the request on it; the request itself was fine.
REPLICA_LOST = (ActorDiedError, ActorUnavailableError)
RETRY_AFTER_S = 1


@app.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@app.exception_handler(HTTPException)
async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    # Unknown routes (404) and wrong methods (405) answer in the same shape as everything else.
    return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(400, str(exc.errors()[:1])).body(), status_code=400)


@app.exception_handler(Exception)
async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)


@dataclass(frozen=True)
class Limits:
    """Per-request limits and batching settings a replica enforces (from the `serve` section)."""

    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    max_body_bytes: int = 1_000_000
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01


def _count(counter: Any, n: int, model: str) -> None:
    if n > 0:  # Ray's Counter refuses 0 — an empty answer must not turn into a 500
        counter.inc(n, tags={"model": model})


def key_digest(key: str) -> str:
    """SHA-256 of an API key: the gateway holds and compares digests, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


@serve.deployment(name="LLM", health_check_period_s=10, health_check_timeout_s=30)
class LLMServer:
    """One model replica: the model(s), the request batcher, token limits."""

    def __init__(self, models: list[tuple[str, str]], limits: dict[str, Any]):
        from ray.serve.metrics import Counter, Histogram

        # Serve already exports request counts, status codes and latencies; these add tokens
        # and batch sizes (Prometheus names get a `ray_` prefix).
        self.task = task_of(models[0][1])
        self.engine = Engine(models) if self.task == "causal_lm" else Predictor(models)
        self.limits = Limits(**limits)
        self._fatal: str | None = None
        for batcher in (self.generate_batch, self.classify_batch, self.ner_batch):
            batcher.set_max_batch_size(self.limits.max_batch_size)
        self._in_flight = 0
        self.m_tokens = Counter("raylm_generated_tokens", description="Tokens generated.",
                                tag_keys=("model",))
        self.m_prompt = Counter("raylm_prompt_tokens", description="Prompt tokens read.",
                                tag_keys=("model",))
        self.m_batch = Histogram("raylm_batch_size", description="Requests per generate call.",
                                 boundaries=[1, 2, 4, 8, 16, 32, 64])

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine failed is replaced."""
        if self._fatal:
            raise RuntimeError(self._fatal)

    def ping(self) -> list[str]:
        """The served model names (the gateway's /health asks a replica, so it means 'can answer')."""
        return self.engine.names

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def generate_batch(self, items: list[tuple[str, list[int], Sampling]]) -> list[Completion]:
        self.m_batch.observe(len(items))
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.engine.generate, items)
        except MemoryError as exc:  # the process is in trouble: let Serve replace it
            self._fatal = f"generation failed: {exc!r}"
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def classify_batch(self, items: list[tuple[str, str]]) -> list[Label]:
        self.m_batch.observe(len(items))
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.classify, items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def ner_batch(self, items: list[tuple[str, str]]) -> list[list[Entity]]:
        self.m_batch.observe(len(items))
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.ner, items)

    async def _batched(self, batcher: Any, items: list[Any]) -> list[Any]:
        """Sends items through a `serve.batch` method. Serve forms the next batch while the
        current one runs, so a batch only grows during its wait: wait only when other requests
        are in flight, so a lone request starts at once."""
        self._in_flight += 1
        batcher.set_batch_wait_timeout_s(
            self.limits.batch_wait_timeout_s if self._in_flight > 1 else 0.0)
        try:
            return await asyncio.gather(*(batcher(item) for item in items))
        finally:
            self._in_flight -= 1

    async def label(self, kind: str, req: LabelRequest, model: str) -> tuple[int, dict[str, Any]]:
        """A `/v1/classify` or `/v1/ner` request → (HTTP status, JSON body); each text is one
        batch item, so texts from many requests share forward passes."""
        texts = req.texts()
        limit = min(self.limits.max_prompt_tokens, self.engine.context_tokens)
        counts = [self.engine.count_tokens(t) for t in texts]
        for i, n in enumerate(counts):
            if n > limit:
                return 400, APIError(400, f"input[{i}] is {n} tokens; the limit is {limit}",
                                     param="input", code="context_length_exceeded").body()
        _count(self.m_prompt, sum(counts), model)
        batcher = self.classify_batch if kind == "classify" else self.ner_batch
        out = await self._batched(batcher, [(model, t) for t in texts])
        if kind == "classify":
            return 200, classify_body(model, [asdict(x) for x in out], sum(counts))
        return 200, ner_body(model, [[asdict(e) for e in ents] for ents in out], sum(counts))

    def _encode(self, kind: str, req: Any, model: str) -> list[int]:
        if kind == "chat":
            return self.engine.encode_chat(model, [m.model_dump(exclude_none=True) for m in req.messages])
        return self.engine.encode_prompt(req.prompt)

    def _sampling(self, req: Any, prompt_len: int) -> Sampling:
        lim = self.limits
        if prompt_len > lim.max_prompt_tokens:
            raise APIError(400, f"prompt is {prompt_len} tokens; the limit is {lim.max_prompt_tokens}",
                           param="prompt", code="context_length_exceeded")
        room = self.engine.context_tokens - prompt_len
        max_tokens = req.max_tokens
        if max_tokens is None:  # OpenAI: 16 for completions, as much as fits for chat
            default = 16 if isinstance(req, CompletionRequest) else lim.max_new_tokens
            max_tokens = max(1, min(default, lim.max_new_tokens, room))
        if max_tokens > lim.max_new_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over the limit {lim.max_new_tokens}",
                           param="max_tokens", code="invalid_value")
        if max_tokens > room:
            raise APIError(400, f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the "
                           f"model's context of {self.engine.context_tokens} tokens",
                           param="max_tokens", code="context_length_exceeded")
        return Sampling(max_tokens, req.temperature, req.top_p, req.stops(), req.seed)

    async def answer(self, kind: str, req: Any, model: str) -> tuple[int, dict[str, Any]]:
        """A non-streaming request → (HTTP status, JSON body); limit errors come back as 4xx."""
        try:
            ids = self._encode(kind, req, model)
            sampling = self._sampling(req, len(ids))
        except APIError as exc:
            return exc.status, exc.body()
        _count(self.m_prompt, len(ids), model)
        (out,) = await self._batched(self.generate_batch, [(model, ids, sampling)])
        _count(self.m_tokens, out.completion_tokens, model)
        body = chat_body if kind == "chat" else completion_body
        return 200, body(model, out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens)

    async def stream(self, kind: str, req: Any, model: str) -> Any:
        """A streaming request: first `(status, error body or None)`, then SSE event strings."""
        try:
            ids = self._encode(kind, req, model)
            sampling = self._sampling(req, len(ids))
        except APIError as exc:
            yield exc.status, exc.body()
            return
        _count(self.m_prompt, len(ids), model)
        yield 200, None
        id_, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        if kind == "chat":
            yield sse(chunk(kind, id_, created, model, {"role": "assistant", "content": ""}, None))
        finish: dict[str, Any] = {}
        try:
            async for piece in self.engine.stream(model, ids, sampling, finish):
                yield sse(chunk(kind, id_, created, model,
                                {"content": piece} if kind == "chat" else piece, None))
        except Exception as exc:  # headers are sent: report in-band, as OpenAI does
            logger.exception("stream failed")
            yield sse(APIError(500, f"generation failed: {exc}").body())
            return
        _count(self.m_tokens, finish.get("completion_tokens", 0), model)
        yield sse(chunk(kind, id_, created, model, {} if kind == "chat" else "",
                        finish.get("reason", "stop")))
        yield sse("[DONE]")


def _unavailable(what: str) -> APIError:
    return APIError(503, f"{what}; retry in {RETRY_AFTER_S}s", code="service_unavailable",
                    type_="server_error")


@serve.deployment(name="Gateway", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    """The HTTP ingress: auth, body limits, request validation, routing to LLM replicas."""

    def __init__(self, llm: Any, names: list[str], max_body_bytes: int, api_key_digest: str | None,
                 task: str = "causal_lm"):
        self.llm = llm
        self.names = names
        self.task = task
        self.max_body_bytes = max_body_bytes
        self._key = api_key_digest
        self._created = int(time.time())

    # -- request plumbing -------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = key_digest(token.strip())
        # Both sides are fixed-length digests, compared in constant time.
        if not (hmac.compare_digest(given, self._key) and scheme.lower() == "bearer"):
            raise APIError(401, "missing or invalid API key (send `Authorization: Bearer KEY`)",
                           code="invalid_api_key", type_="authentication_error")

    async def _parse(self, request: Request, model: type, task: str) -> Any:
        self._auth(request)
        if task != self.task:  # before the body: a body for another route would only confuse
            raise APIError(400, f"this server serves a {self.task} model: use POST {' or '.join(TASK_ROUTES[self.task])}",
                           code="unsupported_route")
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise APIError(400, f"bad Content-Length header {declared[:32]!r}", code="invalid_request")
        if declared is not None and int(declared) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
        return parse_body(bytes(body), request.headers.get("content-type"), model)

    def _model(self, name: str | None) -> str:
        if name is None:
            return self.names[0]
        if name not in self.names:
            raise APIError(404, f"model {name!r} is not served here; see GET /v1/models "
                           f"({', '.join(self.names)})", param="model", code="model_not_found")
        return name

    async def _answer(self, kind: str, req: Any) -> Any:
        model = self._model(req.model)
        if getattr(req, "stream", False):
            return await self._stream(kind, req, model)
        method = self.llm.label if kind in ("classify", "ner") else self.llm.answer
        for attempt in (1, 2):
            try:
                status, body = await method.remote(kind, req, model)
                return body if status == 200 else JSONResponse(body, status_code=status)
            except REPLICA_LOST:
                if attempt == 2:
                    raise _unavailable("the model replica serving this request stopped") from None
                logger.warning("model replica lost mid-request; retrying once on another")
            except BackPressureError:
                raise _unavailable("every model replica's queue is full") from None

    async def _stream(self, kind: str, req: Any, model: str) -> Any:
        # Before the first event nothing has reached the client, so a lost replica is retried.
        for attempt in (1, 2):
            events = self.llm.options(stream=True).stream.remote(kind, req, model)
            try:
                status, error = await events.__anext__()
                break
            except REPLICA_LOST:
                if attempt == 2:
                    raise _unavailable("the model replica serving this request stopped") from None
            except BackPressureError:
                raise _unavailable("every model replica's queue is full") from None
        if status != 200:
            return JSONResponse(error, status_code=status)

        async def relay() -> Any:
            try:
                async for event in events:
                    yield event
            except REPLICA_LOST:  # mid-stream: the client already has part of the answer
                yield sse(_unavailable("the model replica serving this stream stopped").body())

        return StreamingResponse(relay(), media_type="text/event-stream")

    # -- routes -----------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Any:
        try:
            names = await asyncio.wait_for(self.llm.ping.remote(), timeout=10)
        except (asyncio.TimeoutError, *REPLICA_LOST, BackPressureError):
            raise _unavailable("no model replica answered") from None
        return {"status": "ok", "models": names}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": self._created, "owned_by": "raylm"}
            for n in self.names]}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._answer("text", await self._parse(request, CompletionRequest, "causal_lm"))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._answer("chat", await self._parse(request, ChatRequest, "causal_lm"))

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> Any:
        return await self._answer(
            "classify", await self._parse(request, LabelRequest, "sequence_classification"))

    @app.post("/v1/ner")
    async def ner(self, request: Request) -> Any:
        return await self._answer("ner", await self._parse(request, LabelRequest, "token_classification"))


def build_app(models: list[tuple[str, str]], serve_spec: Any, api_key_digest: str | None) -> Any:
    """A bound Serve application: the Gateway ingress over `LLM` model replicas (generation or
    a classifier, by the checkpoint's task) with the `serve:` section's autoscaling,
    concurrency and resource settings."""
    s = serve_spec
    limits = Limits(s.max_prompt_tokens, s.max_new_tokens, s.max_body_bytes, s.max_batch_size,
                    s.batch_wait_timeout_s)
    options: dict[str, Any] = {
        "autoscaling_config": s.autoscaling.to_serve(),
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    }
    if s.max_queued_requests is not None:
        options["max_queued_requests"] = s.max_queued_requests
    llm = LLMServer.options(**options).bind(models, asdict(limits))
    return Gateway.bind(llm, [n for n, _ in models], s.max_body_bytes, api_key_digest,
                        task_of(models[0][1]))
