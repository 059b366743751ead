"""The model replica: one Serve deployment (`Model`) that loads a checkpoint's serving backend
(the generation Engine or the classifier Predictor, as its task's record says), checks token
limits, batches requests with `serve.batch`, and answers (status, body) pairs and stream events
to the gateway. It never sees HTTP or API keys."""

# No `from __future__ import annotations`: Serve inspects these methods at runtime.

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ray import serve

from raylm.checkpoint import task_of
from raylm.serving.engine import Completion, Sampling
from raylm.serving.guided import ANY_OBJECT, schema_problem
from raylm.serving.logprobs import chat_shape, completion_shape, token_pieces
from raylm.serving.openai_api import (
    APIError,
    chat_body,
    chat_choice,
    chunk,
    classify_body,
    completion_body,
    ner_body,
    new_id,
    sse,
    text_choice,
    usage_chunk,
)
from raylm.serving.openai_requests import (
    CompletionRequest,
    LabelRequest,
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
    max_n: int = 8
    batching: str = "continuous"  # or "static": one `generate` call per `serve.batch` batch


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
        self.continuous = self._continuous()
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

    def _continuous(self) -> Any:
        """The continuous batcher when the job asks for one and this replica can use it."""
        if self.limits.batching != "continuous" or not hasattr(self.engine, "stream"):
            return None  # static batching, or a classifier (one forward pass, nothing to join)
        if self.engine.multi:
            logger.warning(
                "serve.batching continuous: %d adapters share this replica and one running batch "
                "cannot mix them; batching statically",
                len(self.engine.names),
            )
            return None
        from raylm.serving.continuous import ContinuousBatcher

        lim = self.limits
        try:
            return ContinuousBatcher(
                self.engine, lim.max_batch_size, lim.max_prompt_tokens, lim.max_new_tokens
            )
        except Exception as exc:  # this model cannot decode there: serve it, statically
            logger.warning("serve.batching continuous: %s; batching statically", exc)
            return None

    async def _generate(self, items: list[tuple[str, list[int], Sampling]]) -> list[Completion]:
        """Answers for (model, prompt ids, sampling) items: those the continuous batcher takes
        join its running batch one by one, the rest go through `serve.batch` together."""
        if self.continuous is None:
            return await self._batched(self.generate_batch, items)
        takes = [self.continuous.takes(s) for _, _, s in items]
        rest = [item for item, t in zip(items, takes, strict=True) if not t]

        async def static() -> list[Completion]:
            return await self._batched(self.generate_batch, rest) if rest else []

        joined, batched = await asyncio.gather(
            asyncio.gather(
                *(self.continuous.generate(*it) for it, t in zip(items, takes, strict=True) if t)
            ),
            static(),
        )
        mine, theirs = iter(joined), iter(batched)
        return [next(mine) if t else next(theirs) for t in takes]

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine failed is replaced."""
        if self._fatal:
            raise RuntimeError(self._fatal)
        if self.continuous is not None and not self.continuous.alive():
            raise RuntimeError("the continuous batching loop stopped")

    def __del__(self) -> None:
        # Serve calls this on a graceful replica shutdown; the decode loop's thread would
        # otherwise hold the process until Serve's shutdown timeout.
        if getattr(self, "continuous", None) is not None:
            self.continuous.close()

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

    def _prompts(self, kind: str, req: Any, model: str) -> list[list[int]]:
        """The token ids of each prompt (one for chat; one per `prompt` entry for
        completions)."""
        if kind == "chat":
            return [self.engine.encode_chat(model, req.turns())]
        vocab = self.engine.vocab_size
        out = []
        for p in req.prompts():
            if isinstance(p, str):
                out.append(self.engine.encode_prompt(p))
                continue
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400,
                    f"prompt token id {bad[0]} is not in the tokenizer (0..{vocab - 1})",
                    param="prompt",
                    code="invalid_value",
                )
            out.append(list(p))
        return out

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
        return Sampling(
            max_tokens=max_tokens,
            temperature=0.0 if req.greedy() else req.temperature,
            top_p=req.top_p,
            stop=req.stops(),
            seed=req.seed,
            top_k=max(req.top_k, 0),
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            min_tokens=min(req.min_tokens, max_tokens),
            ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens,
            logit_bias=self._logit_bias(req),
            **self._scoring(req),
        )

    @staticmethod
    def _scoring(req: Any) -> dict[str, Any]:
        """Sampling fields for logprobs, echo and JSON output."""
        if isinstance(req, CompletionRequest):
            return {"logprobs": req.logprobs, "echo": req.echo}
        fmt, schema = req.response_format, None
        if fmt is not None and fmt.type == "json_object":
            schema = ANY_OBJECT
        elif fmt is not None and fmt.type == "json_schema":
            given = fmt.json_schema.schema_ or {"type": "object"}
            problem = schema_problem(given)
            if problem:
                raise APIError(
                    400,
                    f"response_format.json_schema.schema {problem}",
                    param="response_format.json_schema.schema",
                    code="invalid_value",
                )
            schema = json.dumps(given, sort_keys=True)
        return {
            "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
            "json_schema": schema,
        }

    def _logit_bias(self, req: Any) -> tuple[tuple[int, float], ...]:
        vocab = self.engine.vocab_size
        bias = []
        for key, value in sorted((req.logit_bias or {}).items()):
            if int(key) >= vocab:
                raise APIError(
                    400,
                    f"logit_bias key {key} is not a token id of this model (0..{vocab - 1})",
                    param="logit_bias",
                    code="invalid_value",
                )
            bias.append((int(key), float(value)))
        return tuple(bias)

    def _plan(self, kind: str, req: Any, model: str) -> list[tuple[list[int], Sampling]]:
        """(prompt ids, sampling) of every choice, prompt by prompt then `n` each (OpenAI's
        choice order); raises APIError for limits. Choice i of a seeded request gets seed + i,
        so the n answers differ and each repeats."""
        prompts = self._prompts(kind, req, model)
        per_prompt = _candidates(req)
        if len(prompts) * per_prompt > self.limits.max_n:
            what = "n" if per_prompt == req.n else "best_of"
            raise APIError(
                400,
                f"{len(prompts)} prompt(s) × {what}={per_prompt} answers is over this server's "
                f"limit of {self.limits.max_n} (serve.max_n)",
                param=what,
                code="invalid_value",
            )
        plan = []
        for ids in prompts:
            base = self._sampling(req, len(ids))
            if per_prompt > req.n and base.logprobs is None:
                base = replace(base, logprobs=0)  # best_of ranks by the chosen tokens' logprobs
            for i in range(per_prompt):
                seed = None if base.seed is None else _wrap_int64(base.seed + i)
                plan.append((ids, replace(base, seed=seed)))
        return plan

    async def answer(self, kind: str, req: Any, model: str) -> tuple[int, dict[str, Any]]:
        """A non-streaming request → (HTTP status, JSON body); limit errors come back as 4xx."""
        try:
            plan = self._plan(kind, req, model)
        except APIError as exc:
            return exc.status, exc.body()
        prompt_tokens = _prompt_tokens(req, plan)
        _count(self.m_prompt, prompt_tokens, model)
        outs = await self._generate([(model, ids, s) for ids, s in plan])
        made = sum(o.completion_tokens for o in outs)  # every candidate's tokens, as OpenAI counts
        plan, outs = _best(req, plan, outs)
        _count(self.m_tokens, made, model)
        if kind == "chat":
            choices = [
                chat_choice(i, o.text, o.finish_reason, self._chat_logprobs(o))
                for i, o in enumerate(outs)
            ]
            return 200, chat_body(model, choices, prompt_tokens, made)
        choices = []
        for i, ((ids, s), o) in enumerate(zip(plan, outs, strict=True)):
            text, logprobs = self._echoed(ids, s, o)
            asked = req.logprobs is not None  # best_of alone computes logprobs only to rank
            choices.append(text_choice(i, text, o.finish_reason, logprobs if asked else None))
        return 200, completion_body(model, choices, prompt_tokens, made)

    def _chat_logprobs(self, out: Completion) -> dict[str, Any] | None:
        if out.logprobs is None:
            return None
        return chat_shape(out.logprobs, self.engine.token_text)

    def _echoed(
        self, ids: list[int], s: Sampling, out: Completion
    ) -> tuple[str, dict[str, Any] | None]:
        """A completion choice's text (after the prompt, with `echo`) and its logprobs."""
        tok = self.engine.tokenizer

        def decode(part: Sequence[int]) -> str:
            return tok.decode(part, skip_special_tokens=s.skip_special_tokens)

        # The prompt as its tokens spell it (a token-id prompt has no other text).
        prompt = decode(ids) if s.echo else ""
        if s.logprobs is None:
            return prompt + out.text, None
        items: list[Any] = list(out.logprobs or [])
        pieces, offsets = token_pieces(decode, self.engine.token_text, out.token_ids)
        offsets = [len(prompt) + o for o in offsets]
        if s.echo:
            items = list(out.prompt_logprobs or []) + items
            before, at = token_pieces(decode, self.engine.token_text, ids)
            pieces, offsets = before + pieces, at + offsets
        return prompt + out.text, completion_shape(items, self.engine.token_text, pieces, offsets)

    async def stream(self, kind: str, req: Any, model: str) -> Any:
        """A streaming request: first `(status, error body or None)`, then SSE event strings.
        Several choices stream one after another, each chunk naming its choice's index."""
        try:
            plan = self._plan(kind, req, model)
        except APIError as exc:
            yield exc.status, exc.body()
            return
        prompt_tokens = _prompt_tokens(req, plan)
        _count(self.m_prompt, prompt_tokens, model)
        yield 200, None
        id_, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        with_usage = req.include_usage()

        def event(
            delta: Any, finish: str | None, index: int, logprobs: dict[str, Any] | None = None
        ) -> str:
            body = chunk(kind, id_, created, model, delta, finish, index, logprobs)
            if with_usage:  # OpenAI: every chunk carries usage, null until the last one
                body["usage"] = None
            return sse(body)

        made = 0
        for index, (ids, sampling) in enumerate(plan):
            if kind == "chat":
                yield event({"role": "assistant", "content": ""}, None, index)
            finish: dict[str, Any] = {}
            try:
                if sampling.logprobs is not None or sampling.echo:
                    # Scored answers come whole: one chunk with every token's logprobs.
                    (out,) = await self._batched(self.generate_batch, [(model, ids, sampling)])
                    finish.update(reason=out.finish_reason, completion_tokens=out.completion_tokens)
                    if kind == "chat":
                        lp = self._chat_logprobs(out)
                        yield event({"content": out.text}, None, index, lp)
                    else:
                        text, lp = self._echoed(ids, sampling, out)
                        yield event(text, None, index, lp)
                else:
                    source = self.engine
                    if self.continuous is not None and self.continuous.takes(sampling):
                        source = self.continuous
                    # aclosing: a client gone mid-stream cancels its request now, not at GC
                    async with contextlib.aclosing(
                        source.stream(model, ids, sampling, finish)
                    ) as pieces:
                        async for piece in pieces:
                            yield event(
                                {"content": piece} if kind == "chat" else piece, None, index
                            )
            except Exception as exc:  # headers are sent: report in-band, as OpenAI does
                logger.exception("stream failed")
                yield sse(APIError(500, f"generation failed: {exc}").body())
                return
            made += finish.get("completion_tokens", 0)
            yield event({} if kind == "chat" else "", finish.get("reason", "stop"), index)
        _count(self.m_tokens, made, model)
        if with_usage:
            yield sse(usage_chunk(kind, id_, created, model, prompt_tokens, made))
        yield sse("[DONE]")


def _candidates(req: Any) -> int:
    """Answers generated per prompt (completions' best_of may ask more than it returns)."""
    return req.candidates() if isinstance(req, CompletionRequest) else req.n


def _prompt_tokens(req: Any, plan: list[tuple[list[int], Sampling]]) -> int:
    """Prompt tokens read: each prompt once, however many candidates it has in the plan."""
    return sum(len(ids) for ids, _ in plan[:: _candidates(req)])


def _best(req: Any, plan: list[Any], outs: list[Completion]) -> tuple[list[Any], list[Completion]]:
    """best_of: each prompt's n candidates with the highest log probability per token (OpenAI's
    ranking), likeliest first. Without best_of above n, everything, as it is."""
    k = _candidates(req)
    if k == req.n:
        return plan, outs

    def per_token(i: int) -> float:
        lps = outs[i].logprobs or []
        return sum(x.logprob for x in lps) / len(lps) if lps else 0.0

    keep = []
    for start in range(0, len(plan), k):
        ranked = sorted(range(start, start + k), key=per_token, reverse=True)
        keep.extend(ranked[: req.n])
    return [plan[i] for i in keep], [outs[i] for i in keep]


def _wrap_int64(value: int) -> int:
    """`value` wrapped into int64, the range a request's seed comes in."""
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)
