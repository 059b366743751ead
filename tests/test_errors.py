"""raylm.errors: exit codes per error kind, the error attributes the CLI reads, and the one
formatter of pydantic errors (`path=value: message`)."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from raylm.errors import (
    CheckpointError,
    GateFailed,
    InputError,
    JobSpecError,
    NotReady,
    PathError,
    RaylmError,
    SettingsChanged,
    StorageError,
    format_error,
    raise_problems,
    shown_value,
)


@pytest.mark.parametrize(
    "kind, code",
    [
        (RaylmError, 1),
        (InputError, 2),
        (CheckpointError, 2),
        (StorageError, 2),
        (NotReady, 2),
        (SettingsChanged, 2),
    ],
)
def test_each_kind_exits_with_its_code(kind, code):
    err = kind("x")
    assert err.exit_code == code
    assert isinstance(err, RaylmError)
    assert err.hint is None


def test_bad_input_is_a_value_error_and_a_changed_setting_is_not_ready():
    assert issubclass(InputError, ValueError)
    assert not issubclass(GateFailed, InputError)
    assert issubclass(SettingsChanged, NotReady)
    assert issubclass(JobSpecError, InputError) and issubclass(PathError, InputError)


def test_job_spec_error_lists_every_problem_under_its_source():
    err = JobSpecError(["a.b=1: bad", "c: required field is missing"], source="jobs/x.yaml")
    assert err.exit_code == 2
    assert err.problems == ["a.b=1: bad", "c: required field is missing"]
    assert err.source == "jobs/x.yaml"
    assert str(err).splitlines() == [
        "jobs/x.yaml: 2 problem(s):",
        "  - a.b=1: bad",
        "  - c: required field is missing",
    ]


def test_job_spec_error_source_defaults_to_job():
    err = JobSpecError(["p"])
    assert err.source == "job"
    assert str(err).startswith("job: 1 problem(s):")


def test_path_error_keeps_the_path_as_text_and_the_problem():
    from pathlib import Path

    err = PathError(Path("/no/such.yaml"), "no such job file")
    assert err.exit_code == 2
    assert err.path == "/no/such.yaml" and isinstance(err.path, str)
    assert err.problem == "no such job file"
    assert str(err) == "/no/such.yaml: no such job file"


def test_gate_failure_exits_3_and_lists_its_failures():
    err = GateFailed(["eval_loss=3.0 > max 2.0", "accuracy=0.1 < min 0.5"])
    assert err.exit_code == 3
    assert err.failures == ["eval_loss=3.0 > max 2.0", "accuracy=0.1 < min 0.5"]
    assert str(err) == (
        "the evaluation gate refused the winner: eval_loss=3.0 > max 2.0; accuracy=0.1 < min 0.5"
    )


def test_shown_value_is_the_repr_up_to_the_limit():
    assert shown_value("abc") == "'abc'"
    assert shown_value(3) == "3"
    assert shown_value([1, "a"]) == "[1, 'a']"
    exactly = "x" * 78  # repr adds the two quotes: 80 characters
    assert shown_value(exactly) == repr(exactly)
    longer = "x" * 79
    cut = shown_value(longer)
    assert len(cut) == 80 and cut == repr(longer)[:77] + "..."
    assert shown_value("abcdefghij", limit=8) == "'abcd..."
    assert shown_value("abcdef", limit=8) == "'abcdef'"


@pytest.mark.parametrize("value, word", [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")])
def test_non_finite_floats_are_shown_as_words(value, word):
    assert shown_value(value) == repr(word)


def test_finite_floats_are_shown_as_numbers():
    assert shown_value(0.5) == "0.5"


def test_format_error_names_path_and_value():
    err = {"type": "greater_than", "loc": ("lora", "r"), "msg": "must be > 0", "input": 0}
    assert format_error(err) == ("lora.r", "lora.r=0: must be > 0")


def test_format_error_leaves_out_the_tags_of_a_tagged_union():
    """`scaling.num_workers` is a count or a {min, max} range: pydantic names the branch in the
    error's location; the message names the field as the job file spells it."""
    err = {
        "type": "greater_than_equal",
        "loc": ("scaling", "num_workers", "range", "min"),
        "msg": "Input should be greater than or equal to 1",
        "input": 0,
    }
    assert format_error(err)[0] == "scaling.num_workers.min"
    err["loc"] = ("scaling", "num_workers", "count")
    assert format_error(err)[1].startswith("scaling.num_workers=0: ")


def test_format_error_drops_pydantics_value_error_prefix():
    err = {"type": "value_error", "loc": ("a",), "msg": "Value error, too big", "input": 9}
    assert format_error(err) == ("a", "a=9: too big")


def test_format_error_puts_the_prefix_before_the_path_and_handles_integer_parts():
    err = {"type": "x", "loc": ("messages", 0, "role"), "msg": "bad", "input": "bot"}
    assert format_error(err, prefix="serve.") == (
        "serve.messages.0.role",
        "serve.messages.0.role='bot': bad",
    )


def test_format_error_limits_the_shown_value():
    err = {"type": "x", "loc": ("p",), "msg": "bad", "input": "y" * 100}
    path, line = format_error(err, limit=10)
    assert path == "p"
    assert line == "p='yyyyyy...: bad"
    _, default = format_error(err)
    assert "'" + "y" * 76 + "...: bad" in default


def test_format_error_unknown_key_and_missing_field():
    extra = {"type": "extra_forbidden", "loc": ("lora", "rank"), "msg": "Extra", "input": 8}
    path, line = format_error(extra)
    assert path == "lora.rank"
    assert line.startswith("lora.rank: unknown key (value 8)")
    assert line.endswith("; check the spelling")
    assert format_error(extra, limit=2)[1].startswith("lora.rank: unknown key (value 8)")
    long_extra = {**extra, "input": "z" * 50}
    assert "(value 'zz...)" in format_error(long_extra, limit=6)[1]
    missing = {"type": "missing", "loc": ("model",), "msg": "Field required", "input": {}}
    assert format_error(missing) == ("model", "model: required field is missing")


def test_format_error_at_top_level_says_so():
    err = {"type": "model_type", "loc": (), "msg": "Input should be a dict", "input": 3}
    assert format_error(err) == ("", "(top level)=3: Input should be a dict")
    extra = {"type": "extra_forbidden", "loc": (), "msg": "x", "input": 1}
    assert format_error(extra)[1].startswith("(top level): unknown key")
    missing = {"type": "missing", "loc": (), "msg": "x", "input": 1}
    assert format_error(missing) == ("", "(top level): required field is missing")


def test_format_error_reads_real_pydantic_errors():
    class M(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int

        @field_validator("n")
        @classmethod
        def _small(cls, v: int) -> int:
            if v > 5:
                raise ValueError("must be at most 5")
            return v

    with pytest.raises(ValidationError) as info:
        M.model_validate({"n": 7, "m": 1})
    lines = dict(format_error(e) for e in info.value.errors(include_url=False))
    assert set(lines) == {"n", "m"}
    assert lines["n"] == "n=7: must be at most 5"
    assert lines["m"].startswith("m: unknown key (value 1)")


def test_raise_problems_without_problems_returns():
    assert raise_problems("T", []) is None


def test_raise_problems_raises_one_error_with_every_problem():
    with pytest.raises(ValidationError) as info:
        raise_problems("Thing", [(["a", "b"], 3, "bad a.b"), (["c"], "v", "bad c")])
    exc = info.value
    assert exc.title == "Thing"
    errors = exc.errors(include_url=False)
    assert [(e["type"], e["loc"], e["input"], e["msg"]) for e in errors] == [
        ("check", ("a", "b"), 3, "bad a.b"),
        ("check", ("c",), "v", "bad c"),
    ]
    assert [format_error(e)[1] for e in errors] == ["a.b=3: bad a.b", "c='v': bad c"]
