"""Continuous batching for a replica (`serve.batching: continuous`): transformers'
`ContinuousBatchingManager` runs one background decode loop over a paged KV cache; a request
joins the running batch at the next decode step and leaves it when done, instead of waiting for a
whole `generate` batch to finish. No Ray here: the replica awaits these coroutines, tests call
them directly.

What the manager decodes: greedy answers of the first (default) model — whole or streamed, with
per-request `max_tokens`, stop strings (checked on the decoded text; the request is cancelled
there) and `ignore_eos`. Everything else goes through `Engine.generate` as before (see `takes`):
the manager's sampler draws from torch's global RNG on its own thread, which would make a seeded
request's answer depend on what else was running; its logits processors cover temperature, top-k
and top-p only; and one batch cannot mix peft adapters.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from raylm.serving.engine import Completion, Engine, Sampling, cut_at_stop

# KV-cache page (tokens per block). Small pages waste little on short chat answers.
PAGE_TOKENS = 32


class ContinuousBatcher:
    """The manager over an Engine's (single) model, sized for `max_batch_size` requests of up
    to `max_prompt_tokens + max_new_tokens` tokens each."""

    def __init__(
        self, engine: Engine, max_batch_size: int, max_prompt_tokens: int, max_new_tokens: int
    ):
        """Starts the decode loop and checks it answers. Raises ValueError (or the manager's own
        error) when this model cannot decode here exactly as `generate` does; the replica then
        batches statically."""
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if engine.multi:
            raise ValueError("continuous batching serves one model; adapters batch statically")
        model, tok = engine.model, engine.tokenizer
        attention = model.config._attn_implementation
        if attention != "sdpa":
            # The manager would switch the shared model to another attention implementation,
            # under the static path's feet too.
            raise ValueError(f"the model runs {attention!r} attention; continuous needs 'sdpa'")
        # The model's own generation defaults (e.g. a repetition_penalty in its
        # generation_config.json), as `generate` applies them, with greedy decoding.
        generation = copy.deepcopy(model.generation_config)
        generation.update(
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        if len(model._get_logits_processor(generation)):
            raise ValueError(
                "the model's generation_config adds logits processors the continuous manager "
                "may drop; batching statically"
            )
        per_request = min(max_prompt_tokens + max_new_tokens, engine.context_tokens)
        config = ContinuousBatchingConfig(
            page_size=PAGE_TOKENS,
            num_blocks=max_batch_size * math.ceil(per_request / PAGE_TOKENS),
            max_batch_tokens=max(max_prompt_tokens, 256),  # prefill chunk per decode step
            max_requests_per_batch=max_batch_size,
            auto_switch_to_flash=False,
        )
        self.engine = engine
        self._manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=config
        )
        self._ids = itertools.count()
        self._manager.start()
        self._probe()

    def _probe(self, timeout_s: float = 120.0) -> None:
        """One token through the loop before the replica takes traffic: a model whose forward
        cannot run on the paged cache fails here, not on every request after."""
        tok = self.engine.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        request_id = "raylm-probe"
        self._manager.add_request([start], request_id=request_id, max_new_tokens=1)
        deadline = time.monotonic() + timeout_s
        out = None
        while time.monotonic() < deadline and (out is None or not out.is_finished()):
            out = self._manager.get_result(request_id=request_id, timeout=1.0) or out
            if not self._manager.is_running():
                break
        if out is None or not out.is_finished() or out.error:
            self.close()
            raise RuntimeError(
                f"the continuous batching loop did not answer a one-token probe: "
                f"{(out.error if out else None) or 'no answer'}"
            )

    def in_flight(self) -> int:
        """Requests the decode loop holds now (decoding, or waiting for cache blocks)."""
        processor = self._manager.batch_processor
        if processor is None:
            return 0
        return len(processor.scheduler.active_requests) + len(processor.scheduler.waiting_requests)

    def alive(self) -> bool:
        """Whether the decode loop is running (it stops on a fatal error)."""
        return self._manager.is_running()

    def close(self) -> None:
        """Stops the decode loop at once (pending requests fail); a second call is a no-op."""
        if self._manager.is_running():
            self._manager.stop(block=True, timeout=30, hard_stop=True)

    def _drop_orphans(self) -> None:
        """Empties the manager's shared output queue. Every request here registers a handler,
        so what lands in that queue is an output of a request already let go (its last decode
        step, scheduled before the cancel took effect); one still decoding is cancelled."""
        q = self._manager.output_router.output_queue
        while True:
            try:
                out = q.get_nowait()
            except Exception:  # queue.Empty
                return
            if not out.is_finished():
                self._manager.cancel_request(out.request_id)

    @staticmethod
    def takes(s: Sampling) -> bool:
        """Whether a request decodes here (else the static `Engine.generate` path)."""
        return (
            s.temperature == 0
            and s.max_tokens > 0
            and s.repetition_penalty == 1.0
            and not (s.presence_penalty or s.frequency_penalty or s.min_tokens)
            and not s.logit_bias
            and s.logprobs is None
            and not s.echo
            and s.json_schema is None
        )

    async def _tokens(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[list[int], bool]]:
        """(the generated ids so far, finished) after each decode step. Leaving the iteration
        early cancels the request, which frees its cache blocks."""
        self._drop_orphans()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        request_id = f"raylm-{next(self._ids)}"
        self._manager.register_result_handler(request_id, queue.put_nowait)
        added = self._manager.add_request(
            list(ids),
            request_id=request_id,
            max_new_tokens=s.max_tokens,
            streaming=True,
            eos_token_id=-1 if s.ignore_eos else self.engine.tokenizer.eos_token_id,
        )
        finished = added is None
        try:
            if added is None:
                raise RuntimeError("the continuous batching loop is not accepting requests")
            while not finished:
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if not self._manager.is_running():  # it died: this request never ends
                        finished = True
                        raise RuntimeError("the continuous batching loop stopped") from None
                    continue
                if out.error:
                    finished = True
                    raise RuntimeError(f"generation failed: {out.error}")
                finished = out.is_finished()
                yield list(out.generated_tokens), finished
        finally:
            if not finished:
                self._manager.cancel_request(request_id)
            # transformers drops a handler only at its request's last output, which a
            # cancelled (or never added) request does not send; one left behind would keep its
            # event loop referenced, and delivering to a closed loop kills the decode thread.
            router = self._manager.output_router
            with router._lock:
                router.result_handlers.pop(request_id, None)
            if not finished:
                self._drop_orphans()

    def _text(self, tokens: list[int], s: Sampling) -> str:
        eos = self.engine.tokenizer.eos_token_id
        if eos in tokens and not s.ignore_eos:
            tokens = tokens[: tokens.index(eos)]
        return self.engine.tokenizer.decode(tokens, skip_special_tokens=s.skip_special_tokens)

    async def generate(self, model: str, ids: list[int], s: Sampling) -> Completion:
        """One whole answer, as `Engine.generate` gives it."""
        tokens: list[int] = []
        source = self._tokens(ids, s)
        try:
            async for tokens, _ in source:
                if s.stop and cut_at_stop(self._text(tokens, s), s.stop)[1]:
                    break  # the rest would be cut anyway: free the slot now
        finally:
            await source.aclose()
        return self.engine.completion(model, ids, s, tokens)

    async def stream(
        self, model: str, ids: list[int], s: Sampling, finish: dict[str, Any]
    ) -> AsyncIterator[str]:
        """Text pieces as they are decoded, with `Engine.stream`'s contract: stop strings held
        back until they cannot start one; sets finish["reason"/"completion_tokens"]. A consumer
        that goes away (client disconnect) cancels the request."""
        hold = max((len(x) for x in s.stop), default=1) - 1
        tokens: list[int] = []
        sent, stopped = 0, False
        source = self._tokens(ids, s)
        try:
            async for tokens, done in source:
                text = self._text(tokens, s)
                if text.endswith("\ufffd") and not done:
                    continue  # half of a multi-byte character: wait for the rest
                cut, stopped = cut_at_stop(text, s.stop)
                end = len(cut) if stopped else (len(text) if done else max(sent, len(text) - hold))
                if end > sent:
                    yield text[sent:end]
                    sent = end
                if stopped:
                    break
        finally:
            await source.aclose()
        out = self.engine.completion(model, ids, s, tokens)
        finish.update(
            reason="stop" if stopped else out.finish_reason,
            completion_tokens=out.completion_tokens,
        )
