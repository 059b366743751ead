"""Text generation for serving: one base model with any number of LoRA adapters, prompts in the
format each checkpoint was trained with, batched decoding and streaming. No Ray here — a Serve
replica wraps an Engine, and tests and benches call one directly as the in-process baseline.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raylm.checkpoint import load_served
from raylm.data import generation_prompt_ids


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request (OpenAI names; temperature 0 means greedy)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    """One generated answer."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"


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
        self.context_tokens = int(
            getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30
        )
        # generate() on a peft model swaps hooks and methods on the module: one call at a time.
        self._lock = threading.Lock()

    # -- prompts ---------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a raw completion prompt (with the tokenizer's usual special tokens)."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, model: str, messages: list[Mapping[str, str]]) -> list[int]:
        """Ids asking `model` for the next assistant turn, in the format it was trained on."""
        fmt, template = self._format[model]
        return generation_prompt_ids(self.tokenizer, fmt, template, messages)

    # -- generation ------------------------------------------------------------------------
    def _gen_kwargs(self, s: Sampling, max_new: int) -> dict[str, Any]:
        tok = self.tokenizer
        kw: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        }
        if s.temperature > 0:
            kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
        else:
            kw.update(do_sample=False)
        if s.stop:
            kw.update(stop_strings=list(s.stop), tokenizer=tok)
        return kw

    def _run(self, jobs: list[_Job], max_new: int, **extra: Any) -> Any:
        """One `generate` call over left-padded rows; returns only the new token ids."""
        import torch

        width = max(len(j.ids) for j in jobs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs])
        kw = self._gen_kwargs(jobs[0].sampling, max_new) | extra
        if self._multi:
            kw["adapter_names"] = [j.adapter for j in jobs]
        with self._lock, torch.inference_mode():
            if jobs[0].sampling.seed is not None:
                torch.manual_seed(jobs[0].sampling.seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kw)
        return out[:, width:]

    def _finish(self, job: _Job, new_ids: list[int]) -> Completion:
        tok, s = self.tokenizer, job.sampling
        new_ids = new_ids[: s.max_tokens]
        reason = "length"
        if tok.eos_token_id in new_ids:
            new_ids = new_ids[: new_ids.index(tok.eos_token_id)]
            reason = "stop"
        text, stopped = cut_at_stop(tok.decode(new_ids, skip_special_tokens=True), s.stop)
        return Completion(text, len(job.ids), len(new_ids), "stop" if stopped else reason)

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
            key = (s.temperature > 0, s.temperature, s.top_p, s.stop, s.seed, solo)
            groups.setdefault(key, []).append(i)
        out: list[Completion | None] = [None] * len(jobs)
        for idx in groups.values():
            group = [jobs[i] for i in idx]
            new = self._run(group, max(j.sampling.max_tokens for j in group))
            for i, row in zip(idx, new.tolist(), strict=True):
                out[i] = self._finish(jobs[i], row)
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
            self.tokenizer, skip_prompt=True, skip_special_tokens=True
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
        new = (await fut)[0].tolist()
        completion = self._finish(job, new)
        finish.update(
            reason="stop" if stopped else completion.finish_reason,
            completion_tokens=completion.completion_tokens,
        )
