"""Evaluation inside a training run, per task: eval loss and perplexity (+ exact match by greedy
generation) for causal LM, accuracy and macro-F1 for sequence classification, entity-level
precision/recall/F1 for NER; and the probe logits a checkpoint keeps.

Every worker scores its shard of the eval set and counts (not ratios) are summed across
workers, so the metrics are those of the whole eval set whatever the worker count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raylm.job import JobSpec
from raylm.tasks import TASKS

PROBE_FALLBACK_TEXT = "The quick brown fox"


@dataclass
class EvalContext:
    """What every evaluator needs: the engine (or any module with `.module`), the tokenizer,
    this worker's view of the eval set, and the label names of a classifier."""

    engine: Any
    tok: Any
    evals: list[Any]
    spec: JobSpec
    rank: int = 0
    world: int = 1
    labels: list[str] | None = None


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums `values` over every worker (a collective when torch.distributed runs)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _even_shard(items: list[Any], rank: int, world: int) -> list[tuple[Any, bool]]:
    """Every rank gets the same count (ZeRO-3 forwards are collectives); padding rows count 0."""
    per = math.ceil(len(items) / world)
    out = []
    for i in range(per):
        j = rank + i * world
        out.append((items[j % len(items)], j < len(items)))
    return out


def evaluate(ctx: EvalContext) -> dict[str, float]:
    """The job's eval metrics over the whole eval set (a collective: every worker calls it), by
    the scorer its task's record names: causal LM eval_loss, perplexity (+ exact_match);
    sequence classification eval_loss, accuracy, macro_f1; token classification eval_loss,
    entity_precision/recall/f1."""
    return TASKS[ctx.spec.model.task].evaluate_fn()(ctx)


def _batches(ctx: EvalContext) -> Any:
    """This worker's eval batches: (collated batch, bool tensor of rows that are real)."""
    import torch

    from raylm.data import collate

    shard = _even_shard(ctx.evals, ctx.rank, ctx.world)
    micro = ctx.spec.training.micro_batch_size
    for i in range(0, len(shard), micro):
        chunk = shard[i : i + micro]
        yield (
            collate([e for e, _ in chunk], ctx.tok.pad_token_id),
            torch.tensor([real for _, real in chunk]),
        )


def evaluate_classifier(ctx: EvalContext) -> dict[str, float]:
    """Eval loss, accuracy and macro-F1 of a sequence classifier (confusion counts all-reduced)."""
    import torch

    from raylm.metrics import classification_scores

    engine, k = ctx.engine, len(ctx.labels or [])
    engine.eval()
    loss_sum = count = 0.0
    matrix = torch.zeros((k, k), dtype=torch.float64)
    with torch.no_grad():
        for batch, keep in _batches(ctx):
            logits = engine(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            logits, truth = logits[keep].float(), batch["labels"][keep]
            loss_sum += torch.nn.functional.cross_entropy(logits, truth, reduction="sum").item()
            count += len(truth)
            for t, p in zip(truth.tolist(), logits.argmax(-1).tolist(), strict=True):
                matrix[t, p] += 1
    engine.train()
    loss_sum, count, *cells = all_reduce_sum([loss_sum, count, *matrix.flatten().tolist()])
    rows = [cells[i * k : (i + 1) * k] for i in range(k)]
    return {"eval_loss": loss_sum / max(count, 1.0), **classification_scores(rows)}


def evaluate_tagger(ctx: EvalContext) -> dict[str, float]:
    """Eval loss and entity-level precision/recall/F1 of a BIO tagger (counts all-reduced)."""
    import torch

    from raylm.data import IGNORE_INDEX
    from raylm.metrics import entity_counts, entity_scores

    engine, labels = ctx.engine, ctx.labels or []
    engine.eval()
    loss_sum = count = 0.0
    true_tags: list[list[str]] = []
    pred_tags: list[list[str]] = []
    with torch.no_grad():
        for batch, keep in _batches(ctx):
            logits = engine(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            truth = batch["labels"]
            truth[~keep] = IGNORE_INDEX
            loss_sum += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                truth.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += (truth != IGNORE_INDEX).sum().item()
            # One tag per word: the prediction at each word's first sub-token (where labels sit).
            for row_truth, row_pred in zip(truth, logits.argmax(-1), strict=True):
                scored = row_truth != IGNORE_INDEX
                if scored.any():
                    true_tags.append([labels[i] for i in row_truth[scored].tolist()])
                    pred_tags.append([labels[i] for i in row_pred[scored].tolist()])
    engine.train()
    hits, n_pred, n_true = entity_counts(true_tags, pred_tags)
    loss_sum, count, hits, n_pred, n_true = all_reduce_sum([loss_sum, count, hits, n_pred, n_true])
    return {"eval_loss": loss_sum / max(count, 1.0), **entity_scores(hits, n_pred, n_true)}


def evaluate_lm(ctx: EvalContext) -> dict[str, float]:
    """Eval loss and perplexity over the eval set; exact match by greedy generation if enabled."""
    import torch

    from raylm.data import IGNORE_INDEX

    engine = ctx.engine
    engine.eval()
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for batch, keep in _batches(ctx):
            logits = engine(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            labels = batch["labels"][:, 1:]
            labels[~keep] = IGNORE_INDEX
            per_tok = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            loss_sum += per_tok.item()
            tokens += (labels != IGNORE_INDEX).sum().item()
        metrics: dict[str, float] = {}
        loss_sum, tokens = all_reduce_sum([loss_sum, tokens])
        metrics["eval_loss"] = loss_sum / max(tokens, 1.0)
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        if ctx.spec.exact_match_enabled:
            metrics.update(_exact_match(ctx))
    engine.train()
    return metrics


def _answer_prompt(spec: JobSpec, tok: Any, row: dict[str, Any]) -> tuple[list[int], str]:
    """(prompt ids, reference answer) of an eval row: an instruction row through the job's
    template, a chat row up to its last assistant turn through the tokenizer's chat template —
    the prompts serving builds for the same data (raylm.data.generation_prompt_ids)."""
    from raylm.data import format_prompt, generation_prompt_ids

    if spec.data.format == "chat":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        ids = generation_prompt_ids(tok, "chat", None, messages[:last])
        return list(ids), str(messages[last]["content"])
    return list(tok(format_prompt(spec.data.template, row))["input_ids"]), str(row["output"])


def _exact_match(ctx: EvalContext) -> dict[str, float]:
    """Greedy answers to the first `eval_max_examples` eval rows against their references:
    `exact_match` (whitespace-trimmed; an instruction answer's first line) and
    `exact_match_normalized` (case, spacing and surrounding punctuation ignored). Generation
    ends at the tokenizer's end-of-text token, the end of an assistant turn in a chat template."""
    import torch

    from raylm.metrics import normalized_answer

    engine, tok, spec = ctx.engine, ctx.tok, ctx.spec
    rows = [e.row for e in ctx.evals[: spec.training.eval_max_examples]]
    shard = _even_shard(rows, ctx.rank, ctx.world)
    hits = loose = count = 0.0
    for i in range(0, len(shard), spec.training.micro_batch_size):
        chunk = shard[i : i + spec.training.micro_batch_size]
        prompts = [_answer_prompt(spec, tok, row) for row, _ in chunk]
        width = max(len(ids) for ids, _ in prompts)
        pad = tok.pad_token_id
        # Left-padded: generation continues from the right edge of every row.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in prompts])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in prompts])
        out = engine.module.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=spec.training.eval_max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            synced_gpus=spec.deepspeed.zero_stage == 3,
        )
        for (_, real), (_, want), ids in zip(chunk, prompts, out[:, width:], strict=True):
            if not real:
                continue
            text = tok.decode(ids, skip_special_tokens=True).strip()
            if spec.data.format != "chat":
                text = text.split("\n")[0].strip()
            hits += text == want.strip()
            loose += normalized_answer(text) == normalized_answer(want)
            count += 1
    hits, loose, count = all_reduce_sum([hits, loose, count])
    return {
        "exact_match": hits / max(count, 1.0),
        "exact_match_normalized": loose / max(count, 1.0),
    }


def probe(ctx: EvalContext) -> tuple[Any, Any]:
    """A fixed input and the model's logits for it (a collective under ZeRO-3): the last
    position's for a generator, the first eval example's whole output for a classifier."""
    import torch

    from raylm.data import format_prompt

    engine, tok, spec, evals = ctx.engine, ctx.tok, ctx.spec, ctx.evals
    if TASKS[spec.model.task].labelled:
        ids = torch.tensor(evals[0].input_ids)
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).logits[
                0
            ]
        engine.train()
        return ids, logits
    if spec.data.format == "instruction" and evals and evals[0].row:
        text = format_prompt(spec.data.template, evals[0].row)
    else:
        text = PROBE_FALLBACK_TEXT
    ids = tok(text, return_tensors="pt")["input_ids"]
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
    engine.train()
    return ids[0], logits
