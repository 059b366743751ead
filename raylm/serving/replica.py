"""The model replica: one Serve deployment (`Model`) that loads a checkpoint's serving backend
(the generation Engine or the classifier Predictor, as its task's record says), checks token
limits, batches requests with `serve.batch`, and answers (status, body) pairs and stream events
to the gateway. It never sees HTTP or API keys."""

# No `from __future__ import annotations`: Serve inspects these methods at runtime.

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from ray import serve

from raylm.checkpoint import task_of
from raylm.serving.engine import Completion, Sampling
from raylm.serving.openai_api import (
    APIError,
    CompletionRequest,
    LabelRequest,
    chat_body,
    chunk,
    classify_body,
    completion_body,
    ner_body,
    new_id,
    sse,
)
from raylm.serving.predictor import Entity, Label
from raylm.tasks import TASKS

logger = logging.getLogger("ray.serve")


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


@serve.deployment(name="Model", health_check_period_s=10, health_check_timeout_s=30)
class ModelServer:
    """One model replica (generation or a classifier): the model(s), the request batcher, token
    limits."""

    def __init__(self, models: list[tuple[str, str]], limits: dict[str, Any]):
        from ray.serve.metrics import Counter, Histogram

        # Serve already exports request counts, status codes and latencies; these add tokens
        # and batch sizes (Prometheus names get a `ray_` prefix).
        self.task = task_of(models[0][1])
        self.engine = TASKS[self.task].backend_cls()(models)
        self.limits = Limits(**limits)
        self._fatal: str | None = None
        for batcher in (self.generate_batch, self.classify_batch, self.ner_batch):
            batcher.set_max_batch_size(self.limits.max_batch_size)
        self._in_flight = 0
        self.m_tokens = Counter(
            "raylm_generated_tokens", description="Tokens generated.", tag_keys=("model",)
        )
        self.m_prompt = Counter(
            "raylm_prompt_tokens", description="Prompt tokens read.", tag_keys=("model",)
        )
        self.m_batch = Histogram(
            "raylm_batch_size",
            description="Requests per generate call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine failed is replaced."""
        if self._fatal:
            raise RuntimeError(self._fatal)

    def ping(self) -> list[str]:
        """The served model names (the gateway's /health asks a replica, so it means 'can
        answer')."""
        return self.engine.names

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def generate_batch(
        self, items: list[tuple[str, list[int], Sampling]]
    ) -> list[Completion]:
        self.m_batch.observe(len(items))
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, self.engine.generate, items
            )
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
            self.limits.batch_wait_timeout_s if self._in_flight > 1 else 0.0
        )
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
                return 400, APIError(
                    400,
                    f"input[{i}] is {n} tokens; the limit is {limit}",
                    param="input",
                    code="context_length_exceeded",
                ).body()
        _count(self.m_prompt, sum(counts), model)
        batcher = self.classify_batch if kind == "classify" else self.ner_batch
        out = await self._batched(batcher, [(model, t) for t in texts])
        if kind == "classify":
            return 200, classify_body(model, [asdict(x) for x in out], sum(counts))
        return 200, ner_body(model, [[asdict(e) for e in ents] for ents in out], sum(counts))

    def _encode(self, kind: str, req: Any, model: str) -> list[int]:
        if kind == "chat":
            return self.engine.encode_chat(
                model, [m.model_dump(exclude_none=True) for m in req.messages]
            )
        return self.engine.encode_prompt(req.prompt)

    def _sampling(self, req: Any, prompt_len: int) -> Sampling:
        lim = self.limits
        if prompt_len > lim.max_prompt_tokens:
            raise APIError(
                400,
                f"prompt is {prompt_len} tokens; the limit is {lim.max_prompt_tokens}",
                param="prompt",
                code="context_length_exceeded",
            )
        room = self.engine.context_tokens - prompt_len
        max_tokens = req.max_tokens
        if max_tokens is None:  # OpenAI: 16 for completions, as much as fits for chat
            default = 16 if isinstance(req, CompletionRequest) else lim.max_new_tokens
            max_tokens = max(1, min(default, lim.max_new_tokens, room))
        if max_tokens > lim.max_new_tokens:
            raise APIError(
                400,
                f"max_tokens {max_tokens} is over the limit {lim.max_new_tokens}",
                param="max_tokens",
                code="invalid_value",
            )
        if max_tokens > room:
            raise APIError(
                400,
                f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {self.engine.context_tokens} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
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
        return 200, body(
            model, out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens
        )

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
                yield sse(
                    chunk(
                        kind,
                        id_,
                        created,
                        model,
                        {"content": piece} if kind == "chat" else piece,
                        None,
                    )
                )
        except Exception as exc:  # headers are sent: report in-band, as OpenAI does
            logger.exception("stream failed")
            yield sse(APIError(500, f"generation failed: {exc}").body())
            return
        _count(self.m_tokens, finish.get("completion_tokens", 0), model)
        yield sse(
            chunk(
                kind,
                id_,
                created,
                model,
                {} if kind == "chat" else "",
                finish.get("reason", "stop"),
            )
        )
        yield sse("[DONE]")
