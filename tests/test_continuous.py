"""`serve.batching: continuous` without Ray: transformers' continuous batching manager behind
raylm's ContinuousBatcher answers exactly as `Engine.generate` does, lets a late request join a
running batch, and frees a cancelled request's slot."""

from __future__ import annotations

import asyncio
import time

import pytest

from raylm.serving.continuous import ContinuousBatcher
from raylm.serving.engine import Engine, Sampling

from .test_api import _reference


@pytest.fixture(scope="module")
def tiny():
    from raylm.models import materialize_tiny_llama

    engine = Engine([("tiny", str(materialize_tiny_llama()))])
    batcher = ContinuousBatcher(engine, max_batch_size=8, max_prompt_tokens=64, max_new_tokens=256)
    yield engine, batcher
    batcher.close()


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A model that never ends a text by itself: answers run to max_tokens."""
    from .conftest import endless_llama

    engine = Engine([("endless", endless_llama(tmp_path_factory.mktemp("endless")))])
    batcher = ContinuousBatcher(engine, max_batch_size=4, max_prompt_tokens=64, max_new_tokens=256)
    yield engine, batcher
    batcher.close()


def test_concurrent_greedy_answers_equal_one_by_one_generate(tiny):
    engine, batcher = tiny
    prompts = ["1", "12 13 14", "99-3=", "7 6 5 4 3 2", "40-1=", "5 6"]
    ids = [engine.encode_prompt(p) for p in prompts]
    limits = [12, 3, 12, 7, 12, 1]
    pairs = list(zip(ids, limits, strict=True))

    async def all_at_once() -> list:
        return await asyncio.gather(
            *(batcher.generate("tiny", i, Sampling(max_tokens=n)) for i, n in pairs)
        )

    out = asyncio.run(all_at_once())
    static = engine.generate([("tiny", i, Sampling(max_tokens=n)) for i, n in pairs])
    assert [o.text for o in out] == [_reference(engine, i, n) for i, n in pairs]
    for o, s in zip(out, static, strict=True):
        assert (o.text, o.finish_reason, o.completion_tokens, o.token_ids) == (
            s.text,
            s.finish_reason,
            s.completion_tokens,
            s.token_ids,
        )
    assert {o.finish_reason for o in out} == {"stop", "length"}  # both ends are exercised
    assert batcher.in_flight() == 0


def test_streams_and_stop_strings_match_the_static_engine(tiny):
    engine, batcher = tiny
    ids = engine.encode_prompt("12 13 14")
    whole = engine.generate([("tiny", ids, Sampling(max_tokens=12))])[0]
    stop = whole.text[3:5]
    assert stop, whole.text

    async def collect(s: Sampling) -> tuple[list[str], dict]:
        finish: dict = {}
        return [p async for p in batcher.stream("tiny", ids, s, finish)], finish

    pieces, finish = asyncio.run(collect(Sampling(max_tokens=12)))
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    assert finish == {"reason": whole.finish_reason, "completion_tokens": whole.completion_tokens}
    stopped = Sampling(max_tokens=12, stop=(stop,))
    pieces, finish = asyncio.run(collect(stopped))
    expected = engine.generate([("tiny", ids, stopped)])[0]
    assert "".join(pieces) == expected.text == whole.text[: whole.text.find(stop)]
    assert finish["reason"] == "stop"
    cut = asyncio.run(batcher.generate("tiny", ids, stopped))
    assert (cut.text, cut.finish_reason, cut.token_ids) == (
        expected.text,
        "stop",
        expected.token_ids,
    )


def test_a_late_request_joins_the_running_batch_and_leaves_first(endless):
    """With static batching a request arriving one token after a batch started waits for the
    whole batch; here it joins at the next decode step and is done long before the first."""
    engine, batcher = endless
    ids = engine.encode_prompt("5")

    async def race() -> tuple[int, int, int]:
        long_done = asyncio.Event()
        progress = {"long": 0}

        async def long() -> None:
            finish: dict = {}
            async for _ in batcher.stream("endless", ids, Sampling(max_tokens=250), finish):
                progress["long"] += 1
            long_done.set()

        task = asyncio.create_task(long())
        while progress["long"] < 2:
            await asyncio.sleep(0.001)
        short = await batcher.generate("endless", ids, Sampling(max_tokens=3))
        at_short_end = progress["long"]
        await task
        return short.completion_tokens, at_short_end, long_done.is_set()

    made, long_pieces_then, long_finished = asyncio.run(race())
    assert made == 3 and long_finished
    assert long_pieces_then < 200, long_pieces_then  # the long answer was still running


def test_a_stream_dropped_by_its_client_is_cancelled_and_frees_its_slot(endless):
    engine, batcher = endless
    ids = engine.encode_prompt("5")

    async def read_three_then_leave() -> int:
        finish: dict = {}
        stream = batcher.stream("endless", ids, Sampling(max_tokens=250, ignore_eos=True), finish)
        got = [await stream.__anext__() for _ in range(3)]
        held = batcher.in_flight()
        await stream.aclose()  # what Serve does when the HTTP client disconnects
        assert len(got) == 3
        return held

    assert asyncio.run(read_three_then_leave()) == 1
    deadline = time.monotonic() + 10
    while batcher.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.in_flight() == 0  # cancelled, not decoded to its 250 tokens in the background
    # ...and the loop serves the next request as before
    out = asyncio.run(batcher.generate("endless", ids, Sampling(max_tokens=4, ignore_eos=True)))
    assert (out.completion_tokens, out.finish_reason) == (4, "length")
    # nothing of the cancelled request is kept: no handler, no undelivered output
    router = batcher._manager.output_router
    assert router.result_handlers == {} and router.output_queue.empty()


def test_models_the_loop_cannot_decode_exactly_are_refused(tmp_path):
    """A model whose generation_config adds logits processors (the manager may drop them), or
    that runs another attention than sdpa (the manager would switch it for the static path
    too), is refused with the reason; the replica then batches statically."""
    import json
    import shutil

    from raylm.models import materialize_tiny_llama

    penalised = tmp_path / "penalised"
    shutil.copytree(materialize_tiny_llama(), penalised)
    config = json.loads((penalised / "generation_config.json").read_text())
    (penalised / "generation_config.json").write_text(
        json.dumps({**config, "repetition_penalty": 1.3})
    )
    with pytest.raises(ValueError, match="logits processors"):
        ContinuousBatcher(Engine([("p", str(penalised))]), 2, 32, 8)
    eager = Engine([("e", str(materialize_tiny_llama()))])
    eager.model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="'eager' attention"):
        ContinuousBatcher(eager, 2, 32, 8)


def test_only_plain_greedy_requests_are_taken():
    assert ContinuousBatcher.takes(Sampling(max_tokens=8, stop=("x",), ignore_eos=True))
    for other in (
        {"temperature": 0.7},
        {"logprobs": 0},
        {"echo": True},
        {"json_schema": "{}"},
        {"logit_bias": ((1, 2.0),)},
        {"repetition_penalty": 1.2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"min_tokens": 2},
        {"max_tokens": 0},
    ):
        assert not ContinuousBatcher.takes(Sampling(**{"max_tokens": 8, **other})), other
