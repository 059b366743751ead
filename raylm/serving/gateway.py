"""The Serve app's HTTP side: a `Gateway` ingress (FastAPI, OpenAI-compatible routes) in front of
the `Model` replicas (`raylm.serving.replica`), reached through a DeploymentHandle, and
`build_app`, which binds the two.

The gateway checks the key, the route, the body and the model name, so every client mistake is a
4xx OpenAI-style JSON error raised before any model work. Keeping HTTP off the model replicas is
what lets a request survive one of them dying: the gateway retries a request whose replica died
once on another, and answers 503 (with Retry-After) rather than 500 if that fails too.
"""
# No `from __future__ import annotations` here: FastAPI reads route annotations at runtime and
# Serve's ingress wrapper hides the module globals it would need to resolve strings.

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from raylm.checkpoint import task_of
from raylm.serving.auth import check_key
from raylm.serving.openai_api import (
    APIError,
    parse_body,
    sse,
)
from raylm.serving.openai_requests import (
    ChatRequest,
    CompletionRequest,
    LabelRequest,
)
from raylm.serving.replica import Limits, ModelServer
from raylm.tasks import TASKS

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
    return JSONResponse(
        APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code
    )


@app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(400, str(exc.errors()[:1])).body(), status_code=400)


@app.exception_handler(Exception)
async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")
    return JSONResponse(
        APIError(500, f"internal error: {type(exc).__name__}").body(), status_code=500
    )


def _unavailable(what: str) -> APIError:
    return APIError(
        503, f"{what}; retry in {RETRY_AFTER_S}s", code="service_unavailable", type_="server_error"
    )


@serve.deployment(name="Gateway", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    """The HTTP ingress: auth, body limits, request validation, routing to Model replicas."""

    def __init__(
        self,
        replicas: Any,
        names: list[str],
        max_body_bytes: int,
        api_key_digest: str | None,
        task: str = "causal_lm",
    ):
        from ray.serve.metrics import Counter

        self.replicas = replicas
        self.names = names
        # Requests whose replica died under them and that were sent to another (stream: only
        # before its first event): what the app survived without the client noticing.
        self.m_retries = Counter(
            "raylm_replica_retries",
            description="Requests retried on another model replica after theirs was lost.",
            tag_keys=("kind",),
        )
        self.task = task
        self.max_body_bytes = max_body_bytes
        self._key = api_key_digest
        self._created = int(time.time())

    # -- request plumbing -------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not check_key(request.headers.get("authorization", ""), self._key):
            raise APIError(
                401,
                "missing or invalid API key (send `Authorization: Bearer KEY`)",
                code="invalid_api_key",
                type_="authentication_error",
            )

    async def _parse(self, request: Request, model: type, task: str) -> Any:
        self._auth(request)
        if task != self.task:  # before the body: a body for another route would only confuse
            raise APIError(
                400,
                f"this server serves a {self.task} model: use POST "
                f"{' or '.join(TASKS[self.task].routes)}",
                code="unsupported_route",
            )
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise APIError(
                400, f"bad Content-Length header {declared[:32]!r}", code="invalid_request"
            )
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
            raise APIError(
                404,
                f"model {name!r} is not served here; see GET /v1/models ({', '.join(self.names)})",
                param="model",
                code="model_not_found",
            )
        return name

    def _retried(self, kind: str) -> None:
        logger.warning("model replica lost before answering; retrying once on another")
        self.m_retries.inc(1, tags={"kind": kind})

    async def _answer(self, kind: str, req: Any) -> Any:
        model = self._model(req.model)
        if getattr(req, "stream", False):
            return await self._stream(kind, req, model)
        method = self.replicas.label if kind in ("classify", "ner") else self.replicas.answer
        for attempt in (1, 2):
            try:
                status, body = await method.remote(kind, req, model)
                return body if status == 200 else JSONResponse(body, status_code=status)
            except REPLICA_LOST:
                if attempt == 2:
                    raise _unavailable("the model replica serving this request stopped") from None
                self._retried(kind)
            except BackPressureError:
                raise _unavailable("every model replica's queue is full") from None

    async def _stream(self, kind: str, req: Any, model: str) -> Any:
        # Before the first event nothing has reached the client, so a lost replica is retried.
        for attempt in (1, 2):
            events = self.replicas.options(stream=True).stream.remote(kind, req, model)
            try:
                status, error = await events.__anext__()
                break
            except REPLICA_LOST:
                if attempt == 2:
                    raise _unavailable("the model replica serving this request stopped") from None
                self._retried(f"{kind}-stream")
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
            names = await asyncio.wait_for(self.replicas.ping.remote(), timeout=10)
        except (asyncio.TimeoutError, *REPLICA_LOST, BackPressureError):
            raise _unavailable("no model replica answered") from None
        return {"status": "ok", "models": names}

    def _card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "raylm"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return {"object": "list", "data": [self._card(n) for n in self.names]}

    @app.get("/v1/models/{name}")
    async def model(self, request: Request, name: str) -> dict[str, Any]:
        """One served model, as `client.models.retrieve(name)` asks for it; 404 if not served."""
        self._auth(request)
        return self._card(self._model(name))

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._answer(
            "text", await self._parse(request, CompletionRequest, "causal_lm")
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._answer("chat", await self._parse(request, ChatRequest, "causal_lm"))

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> Any:
        return await self._answer(
            "classify", await self._parse(request, LabelRequest, "sequence_classification")
        )

    @app.post("/v1/ner")
    async def ner(self, request: Request) -> Any:
        return await self._answer(
            "ner", await self._parse(request, LabelRequest, "token_classification")
        )


def build_app(models: list[tuple[str, str]], serve_spec: Any, api_key_digest: str | None) -> Any:
    """A bound Serve application: the Gateway ingress over `Model` replicas (generation or
    a classifier, by the checkpoint's task) with the `serve:` section's autoscaling,
    concurrency and resource settings."""
    s = serve_spec
    limits = Limits(
        s.max_prompt_tokens,
        s.max_new_tokens,
        s.max_body_bytes,
        s.max_batch_size,
        s.batch_wait_timeout_s,
        s.max_n,
        s.batching,
    )
    options: dict[str, Any] = {
        "autoscaling_config": s.autoscaling.to_serve(),
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    }
    if s.max_queued_requests is not None:
        options["max_queued_requests"] = s.max_queued_requests
    replicas = ModelServer.options(**options).bind(models, asdict(limits))
    return Gateway.bind(
        replicas, [n for n, _ in models], s.max_body_bytes, api_key_digest, task_of(models[0][1])
    )
