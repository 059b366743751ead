"""What `raylm run` asks a served chat model: the job's first held-out question with its system
turn, so the sample answer shows what training taught (pure: no Ray)."""

from __future__ import annotations

import json

from raylm.job import ServeSpec
from raylm.serving.deploy import ServePlan, _sample_body, held_out_chat_sample


def test_a_chat_jobs_sample_is_its_first_held_out_question_with_its_system_turn(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "List the entities."},
                {"role": "user", "content": "Ann Lee visited Oslo ."},
                {"role": "assistant", "content": "people: Ann Lee; places: Oslo"},
            ]
        },
        {"messages": [{"role": "user", "content": "second"}]},
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert held_out_chat_sample(str(path), "Hello!") == (
        "Ann Lee visited Oslo .",
        "List the entities.",
    )
    plan = ServePlan(
        [("m", "/ckpt")],
        ServeSpec(max_new_tokens=20),
        "Ann Lee visited Oslo .",
        [],
        "causal_lm",
        "List the entities.",
    )
    body = json.loads(_sample_body(plan))
    assert body["messages"] == rows[0]["messages"][:2]  # system, then the question; no answer
    assert body["max_tokens"] == 20  # within the server's limit (48 where it allows more)
    assert json.loads(_sample_body(ServePlan([("m", "/c")], ServeSpec())))["max_tokens"] == 48


def test_without_a_readable_held_out_question_the_tasks_sample_is_asked(tmp_path):
    assert held_out_chat_sample(None, "Hello!") == ("Hello!", None)
    assert held_out_chat_sample(str(tmp_path / "gone.jsonl"), "Hello!") == ("Hello!", None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert held_out_chat_sample(str(bad), "Hello!") == ("Hello!", None)
    only_system = tmp_path / "sys.jsonl"
    only_system.write_text(json.dumps({"messages": [{"role": "system", "content": "x"}]}) + "\n")
    assert held_out_chat_sample(str(only_system), "Hello!") == ("Hello!", None)
    no_system = tmp_path / "user.jsonl"
    no_system.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    assert held_out_chat_sample(str(no_system), "Hello!") == ("Hi", None)
    plan = ServePlan([("m", "/c")], ServeSpec(), "Hi")
    assert json.loads(_sample_body(plan))["messages"] == [{"role": "user", "content": "Hi"}]
