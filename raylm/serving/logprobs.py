"""Token log-probabilities: of generated tokens (from `generate`'s raw logits) and of a prompt's
own tokens (one forward pass, for `echo`), and their two OpenAI response shapes (chat's
`logprobs.content` list and the completions API's parallel lists). The numbers are the model's
own distribution: log-softmax of its logits before any sampling setting touches them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenLogprob:
    """One token, its log-probability and the `k` most likely tokens at its position."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _pick(log_probs: Any, token: int, k: int) -> TokenLogprob:
    """`log_probs` is one position's log-softmax row."""
    top: tuple[tuple[int, float], ...] = ()
    if k:
        values, ids = log_probs.topk(k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(log_probs[token]), top)


def generated_logprobs(
    step_logits: Sequence[Any], row: int, tokens: Sequence[int], k: int
) -> list[TokenLogprob]:
    """Per generated token of batch row `row`: `step_logits[t]` is `generate`'s raw logits
    (batch × vocab) at step t (`output_logits=True`)."""
    return [
        _pick(step_logits[t][row].float().log_softmax(-1), token, k)
        for t, token in enumerate(tokens)
    ]


def prompt_logprobs(
    model: Any, ids: Sequence[int], k: int, **forward: Any
) -> list[TokenLogprob | None]:
    """Per prompt token, its log-probability given the tokens before it; the first has no
    context, so None (as OpenAI answers it)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(ids)]), **forward).logits[0]
    log_probs = logits.float().log_softmax(-1)
    return [None] + [_pick(log_probs[i - 1], ids[i], k) for i in range(1, len(ids))]


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_shape(items: Sequence[TokenLogprob], decode: Callable[[int], str]) -> dict[str, Any]:
    """OpenAI chat `choices[i].logprobs`: `content` per token with `top_logprobs`."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = decode(token)
        return {"token": text, "logprob": logprob, "bytes": _token_bytes(text)}

    return {
        "content": [
            {
                **entry(x.id, x.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in x.top],
            }
            for x in items
        ],
        "refusal": None,
    }


def token_pieces(
    decode: Callable[[Sequence[int]], str], name: Callable[[int], str], ids: Sequence[int]
) -> tuple[list[str], list[int]]:
    """Each of `ids`' piece of the text `decode(ids)` and the offset it starts at. Pieces come
    from decoding growing prefixes, so they join to exactly that text whatever the tokenizer's
    spacing rules (a lone decode drops SentencePiece's leading space). A token the text leaves
    out (a special token, with skip_special_tokens) keeps its own spelling from `name`, at the
    offset where it stands."""
    pieces, offsets, before = [], [], ""
    for i, token in enumerate(ids):
        now = decode(ids[: i + 1])
        grown = now.startswith(before)
        offsets.append(len(before) if grown else len(now))
        pieces.append(now[len(before) :] if grown and len(now) > len(before) else name(token))
        before = now
    return pieces, offsets


def completion_shape(
    items: Sequence[TokenLogprob | None],
    decode: Callable[[int], str],
    pieces: Sequence[str],
    offsets: Sequence[int],
) -> dict[str, Any]:
    """The completions API's `choices[i].logprobs`: parallel lists of tokens (their pieces of
    the returned text), their log-probabilities, the top tokens at each position (the chosen
    one included, as OpenAI does) and each token's character offset in the returned text."""
    top: list[dict[str, float] | None] = []
    for x, piece in zip(items, pieces, strict=True):
        if x is None:
            top.append(None)
            continue
        found = {decode(t): lp for t, lp in x.top}
        found.setdefault(piece, x.logprob)
        top.append(found)
    return {
        "tokens": list(pieces),
        "token_logprobs": [None if x is None else x.logprob for x in items],
        "top_logprobs": top,
        "text_offset": list(offsets),
    }
