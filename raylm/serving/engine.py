"""Text generation for serving: one base model with any number of LoRA adapters, prompts in the
format each checkpoint was trained with, batched decoding and streaming. No Ray here — a Serve
replica wraps an Engine, and tests and benches call one directly as the in-process baseline.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from raylm.checkpoint import load_served
from raylm.data import generation_prompt_ids
from raylm.serving.logprobs import TokenLogprob, generated_logprobs, prompt_logprobs


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request (OpenAI and vLLM names; temperature 0 means greedy)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: none; k: each token's and the k most likely
    echo: bool = False  # also score the prompt's own tokens (with logprobs)
    json_schema: str | None = None  # constrain the output to this schema (canonical JSON)


class _Penalties:
    """OpenAI's presence and frequency penalties: each token's logit goes down by
    `frequency × its count so far + presence × (count > 0)`, counting only generated tokens."""

    def __init__(self, start: int, presence: float, frequency: float):
        self.start, self.presence, self.frequency = start, presence, frequency

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        made = input_ids[:, self.start :]
        if made.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, made, torch.ones_like(made, dtype=scores.dtype)
        )
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


@dataclass
class Completion:
    """One generated answer."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    token_ids: list[int] = field(default_factory=list)  # the tokens behind `text`
    logprobs: list[TokenLogprob] | None = None  # per token of `token_ids`, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, for echo


@dataclass
class _Job:
    adapter: str
    ids: list[int]
    sampling: Sampling


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class Engine:
    """Loaded model(s) and tokenizer for generation.

    `models` is a list of (served name, checkpoint dir); the first is the default. Several
    entries must be LoRA adapters over one base: a batch may mix them (peft `adapter_names`).
    """

    def __init__(self, models: Sequence[tuple[str, str]], trust_remote_code: bool | None = None):
        served = load_served(models, trust_remote_code)
        self.tokenizer, self.model, self.names = served.tokenizer, served.model, served.names
        self._adapter, self._multi, self.metadata = served.adapter, served.multi, served.metadata
        self._format = {
            n: (m.get("data_format"), m.get("template")) for n, m in self.metadata.items()
        }
        tok = self.tokenizer
        tok.padding_side = "left"  # generation continues from the right edge of every row
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        # Ids a prompt or logit_bias may name: known to the tokenizer and the embedding.
        self.vocab_size = min(len(tok), int(self.model.config.vocab_size))
        self._watchable: dict[str, bool] = {}  # stop string → can generate() watch for it
        self.context_tokens = int(
            getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30
        )
        # generate() on a peft model swaps hooks and methods on the module: one call at a time.
        self._lock = threading.Lock()

    # -- prompts ---------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a raw completion prompt (with the tokenizer's usual special tokens). An empty
        prompt is the start of a document, as OpenAI's default `<|endoftext|>` prompt is."""
        tok = self.tokenizer
        ids = list(tok(text)["input_ids"])
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return ids or [start]

    def encode_chat(self, model: str, messages: list[Mapping[str, str]]) -> list[int]:
        """Ids asking `model` for the next assistant turn, in the format it was trained on."""
        fmt, template = self._format[model]
        return generation_prompt_ids(self.tokenizer, fmt, template, messages)

    def token_text(self, token: int) -> str:
        """One token as text (special tokens spelled out), as logprobs name tokens."""
        return self.tokenizer.decode([token])

    # -- generation ------------------------------------------------------------------------
    def _gen_kwargs(self, s: Sampling, max_new: int, width: int) -> dict[str, Any]:
        from transformers import LogitsProcessorList

        tok = self.tokenizer
        kw: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": tok.pad_token_id,
            # ignore_eos: generate through end-of-text tokens (benchmarks want exact lengths).
            "eos_token_id": None if s.ignore_eos else tok.eos_token_id,
        }
        if s.temperature > 0:
            kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
            if s.min_p > 0:
                kw["min_p"] = s.min_p
        else:
            kw.update(do_sample=False)
        if s.repetition_penalty != 1.0:
            kw["repetition_penalty"] = s.repetition_penalty
        if s.min_tokens:
            kw["min_new_tokens"] = s.min_tokens
        if s.logit_bias:
            kw["sequence_bias"] = {(t,): b for t, b in s.logit_bias}
        if s.presence_penalty or s.frequency_penalty:
            kw["logits_processor"] = LogitsProcessorList(
                [_Penalties(width, s.presence_penalty, s.frequency_penalty)]
            )
        early = self._early_stops(s.stop)
        if early:
            kw.update(stop_strings=early, tokenizer=tok)
        if s.logprobs is not None:
            kw.update(output_logits=True, return_dict_in_generate=True)
        if s.json_schema is not None:
            from raylm.serving.guided import allowed_tokens_fn

            kw["prefix_allowed_tokens_fn"] = allowed_tokens_fn(tok, s.json_schema)
        return kw

    def _early_stops(self, stops: Sequence[str]) -> list[str]:
        """The stop strings transformers can watch for while generating, to stop early. It
        refuses a string with characters no token spells; such a string still ends the text
        wherever it appears (`cut_at_stop` reads the decoded text)."""
        from transformers import StopStringCriteria

        out = []
        for stop in stops:
            if stop not in self._watchable:
                try:
                    StopStringCriteria(self.tokenizer, [stop])
                    ok = True
                except ValueError:
                    ok = False
                if len(self._watchable) < 10_000:  # client text: keep the memo bounded
                    self._watchable[stop] = ok
            else:
                ok = self._watchable[stop]
            if ok:
                out.append(stop)
        return out

    def _run(self, jobs: list[_Job], max_new: int, **extra: Any) -> tuple[Any, Any]:
        """One `generate` call over left-padded rows: the new token ids, and each step's raw
        logits when the rows asked for logprobs (else None)."""
        import torch

        width = max(len(j.ids) for j in jobs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs])
        kw = self._gen_kwargs(jobs[0].sampling, max_new, width) | extra
        if self._multi:
            kw["adapter_names"] = [j.adapter for j in jobs]
        with self._lock, torch.inference_mode():
            if jobs[0].sampling.seed is not None:
                torch.manual_seed(jobs[0].sampling.seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kw)
        if kw.get("return_dict_in_generate"):
            return out.sequences[:, width:], out.logits
        return out[:, width:], None

    def _finish(
        self, job: _Job, new_ids: list[int], row: int = 0, logits: Any = None
    ) -> Completion:
        tok, s = self.tokenizer, job.sampling
        new_ids = new_ids[: s.max_tokens]
        reason = "length"
        if tok.eos_token_id in new_ids and not s.ignore_eos:
            new_ids = new_ids[: new_ids.index(tok.eos_token_id)]
            reason = "stop"
        text = tok.decode(new_ids, skip_special_tokens=s.skip_special_tokens)
        text, stopped = cut_at_stop(text, s.stop)
        made = len(new_ids)
        if stopped:  # the tokens behind the text: none that only spell the stop string
            new_ids = new_ids[: self._tokens_for(new_ids, len(text), s.skip_special_tokens)]
        out = Completion(text, len(job.ids), made, "stop" if stopped else reason, new_ids)
        if s.logprobs is not None and logits is not None:
            out.logprobs = generated_logprobs(logits, row, new_ids, s.logprobs)
        return out

    def completion(self, model: str, ids: list[int], s: Sampling, new_ids: list[int]) -> Completion:
        """The answer that generated ids make, finished as `generate` finishes its rows (end of
        text, `max_tokens`, stop strings); for decoders other than `generate`."""
        return self._finish(_Job(self._adapter[model], list(ids), s), list(new_ids))

    @property
    def multi(self) -> bool:
        """Whether several adapters share the base (a batch may mix them)."""
        return self._multi

    def _tokens_for(self, ids: list[int], chars: int, skip_special: bool) -> int:
        """How many of `ids` it takes to spell at least `chars` characters."""
        for n in range(len(ids) + 1):
            if len(self.tokenizer.decode(ids[:n], skip_special_tokens=skip_special)) >= chars:
                return n
        return len(ids)

    def score_prompt(self, model: str, ids: list[int], k: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability (and top `k`) given the tokens before it."""
        forward = {"adapter_names": [self._adapter[model]]} if self._multi else {}
        with self._lock:
            return prompt_logprobs(self.model, ids, k, **forward)

    def generate(self, requests: Sequence[tuple[str, list[int], Sampling]]) -> list[Completion]:
        """Answers (model, prompt ids, sampling) requests, batching those that decode alike.

        Rows share a `generate` call when their sampling settings match (adapters may differ);
        a seeded sampled request runs alone so its seed alone decides its answer.
        """
        jobs = [_Job(self._adapter[m], list(ids), s) for m, ids, s in requests]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, j in enumerate(jobs):
            s = j.sampling
            solo = i if (s.seed is not None and s.temperature > 0) else None
            groups.setdefault((replace(s, max_tokens=0), solo), []).append(i)
        out: list[Completion | None] = [None] * len(jobs)
        for idx in groups.values():
            group = [jobs[i] for i in idx]
            most = max(j.sampling.max_tokens for j in group)
            if most == 0:  # max_tokens 0 (echo scoring): nothing to generate
                new, logits = [[] for _ in group], None
            else:
                ids, logits = self._run(group, most)
                new = ids.tolist()
            for r, (i, row) in enumerate(zip(idx, new, strict=True)):
                out[i] = self._finish(jobs[i], row, r, logits)
        for (model, ids, s), c in zip(requests, out, strict=True):
            if c is not None and s.echo and s.logprobs is not None:
                c.prompt_logprobs = self.score_prompt(model, list(ids), s.logprobs)
        return [c for c in out if c is not None]

    async def stream(
        self, model: str, ids: list[int], sampling: Sampling, finish: dict[str, Any]
    ) -> AsyncIterator[str]:
        """Yields text pieces as they are generated; sets finish["reason"/"completion_tokens"].

        Stop strings are held back until they can no longer start one, so a client never sees
        a partial stop sequence. Generation stops early if the consumer goes away.
        """
        from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList

        cancel = threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return cancel.is_set()

        streamer = AsyncTextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=sampling.skip_special_tokens
        )
        job = _Job(self._adapter[model], list(ids), sampling)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            None,
            lambda: self._run(
                [job],
                sampling.max_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Cancelled()]),
            ),
        )
        hold = max((len(s) for s in sampling.stop), default=1) - 1
        text, sent, stopped = "", 0, False
        try:
            async for piece in streamer:
                text += piece
                cut, stopped = cut_at_stop(text, sampling.stop)
                end = len(cut) if stopped else max(sent, len(text) - hold)
                if end > sent:
                    yield text[sent:end]
                    sent = end
                if stopped:
                    break
            if not stopped and len(text) > sent:
                yield text[sent:]
        finally:
            cancel.set()
        new = (await fut)[0][0].tolist()
        completion = self._finish(job, new)
        finish.update(
            reason="stop" if stopped else completion.finish_reason,
            completion_tokens=completion.completion_tokens,
        )
