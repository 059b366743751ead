"""JSON output by constrained decoding (`response_format` json_object / json_schema): at each
step only tokens that keep the text a valid prefix of JSON matching the schema may be chosen.
lm-format-enforcer compiles the schema into a character-level parser over a per-tokenizer prefix
tree; transformers' `generate` asks it through `prefix_allowed_tokens_fn`."""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

# json_object: any JSON object, as OpenAI's JSON mode promises.
ANY_OBJECT = json.dumps({"type": "object"})

# Keyed by the tokenizer itself, not id(): a freed tokenizer's id is reused by the next one.
_tokenizer_data: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


# What the enforcer holds the output to; anything else in a schema would be silently broken.
ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "enum", "const", "minLength", "maxLength", "pattern", "anyOf", "allOf", "$ref", "$defs",
    "definitions",
}  # fmt: skip
# Words that describe and do not constrain. `format` is not among them: JSON Schema calls it an
# annotation, but a client asking for a date or a uuid means it, and the enforcer ignores it.
ANNOTATIONS = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly",
}  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def _unenforced(schema: Any, where: str) -> str | None:
    """The first keyword in `schema` (or its subschemas) that decoding would not enforce."""
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            return f"{where}.{key}" if where else key
        # The enforcer writes an enum's values with Python's str(): True, not true.
        values = value if key == "enum" and isinstance(value, list) else [value]
        if key in ("enum", "const") and any(v is None or isinstance(v, bool) for v in values):
            return f"{where}.{key}" if where else key
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                found = _unenforced(sub, f"{where}.{key}.{name}".lstrip("."))
                if found:
                    return found
        elif key in ("items", "additionalProperties"):
            found = _unenforced(value, f"{where}.{key}".lstrip("."))
            if found:
                return found
        elif key in ("anyOf", "allOf") and isinstance(value, list):
            for i, sub in enumerate(value):
                found = _unenforced(sub, f"{where}.{key}.{i}".lstrip("."))
                if found:
                    return found
    return None


def _const_as_enum(schema: Any) -> Any:
    """`{"const": v}` as `{"enum": [v]}` throughout: lm-format-enforcer 0.11 compiles a numeric
    const but then allows no value after the key (`{"n"` and a stop); a one-value enum it
    enforces, and an enum of a kind it cannot enforce it refuses at compile time."""
    if isinstance(schema, list):
        return [_const_as_enum(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _const_as_enum(v) for k, v in schema.items() if k != "const"}
    if "const" in schema:
        out["enum"] = [schema["const"]]
    return out


def compiled(schema: dict[str, Any]) -> Any:
    """The enforcer's parser for `schema` (after `_const_as_enum`)."""
    from lmformatenforcer import JsonSchemaParser

    return JsonSchemaParser(_const_as_enum(schema))


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` cannot guide decoding (not a JSON Schema, a keyword constrained decoding
    does not enforce, or beyond what the enforcer compiles), or None if it can."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"is not a valid JSON Schema: {exc.message}"
    keyword = _unenforced(schema, "")
    if keyword:
        return f"uses {keyword!r}, which constrained decoding does not enforce"
    try:
        compiled(schema)
    except Exception as exc:  # the enforcer's own errors have no common base class
        return f"cannot be compiled for constrained decoding: {exc}"
    return None


def _regular_tokens(tokenizer: Any) -> list[tuple[int, str, bool]]:
    """(id, text, starts a word) of every non-special token: what the enforcer's prefix tree is
    built from. Decoding after a "0" token shows the leading space a lone decode strips.

    The same as lm-format-enforcer's own transformers integration, which does not import under
    transformers 5 (it looks for `transformers.tokenization_utils`)."""
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    out = []
    for token in range(len(tokenizer)):
        if token in special:
            continue
        after_zero = tokenizer.decode([zero, token])[1:]
        alone = tokenizer.decode([token])
        out.append((token, after_zero, len(after_zero) > len(alone)))
    return out


def _data(tokenizer: Any) -> Any:
    """The enforcer's per-tokenizer tables: one pass over the vocabulary, built once."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    with _lock:
        if tokenizer not in _tokenizer_data:
            _tokenizer_data[tokenizer] = TokenEnforcerTokenizerData(
                _regular_tokens(tokenizer),
                lambda ids: tokenizer.decode(ids).rstrip("\ufffd"),
                tokenizer.eos_token_id,
                False,
                len(tokenizer),
            )
        return _tokenizer_data[tokenizer]


def _count_leading_whitespace() -> None:
    """lm-format-enforcer 0.11 drops a whitespace character that opens a string's content
    (`" a"`) without counting it, so `maxLength` lets one more character through. Send it down
    the path every other character in a string takes."""
    from lmformatenforcer import jsonschemaparser as jp

    cls = jp.StringParsingState
    if getattr(cls.add_character, "raylm_counts_whitespace", False):
        return
    original = cls.add_character

    def add_character(self: Any, char: str) -> Any:
        # Inside quotes only: unquoted values (true, false, null) skip leading whitespace.
        inside = self.require_opening_quote and self.seen_opening_quote
        if (
            inside
            and not self.seen_closing_quote
            and not self.parsed_string
            and char in jp.WHITESPACE_CHARACTERS
        ):
            return jp.PrimitiveParsingState.add_character(self, char)
        return original(self, char)

    add_character.raylm_counts_whitespace = True  # type: ignore[attr-defined]
    cls.add_character = add_character


def allowed_tokens_fn(tokenizer: Any, schema_json: str) -> Any:
    """A `prefix_allowed_tokens_fn` keeping every row of one `generate` call inside the schema
    (`schema_json`: the schema as canonical JSON text, so it can sit in a frozen Sampling)."""
    from lmformatenforcer import CharacterLevelParserConfig, TokenEnforcer

    _count_leading_whitespace()
    data = _data(tokenizer)
    parser = compiled(json.loads(schema_json))
    enforcer = TokenEnforcer(data, parser)
    # One whitespace at a time: a small or unsure model otherwise fills its budget with
    # indentation that is valid JSON and says nothing. Set after TokenEnforcer, which replaces
    # the parser's config with one holding only the tokenizer's alphabet.
    parser.config = CharacterLevelParserConfig(
        alphabet=data.tokenizer_alphabet, max_consecutive_whitespaces=1
    )

    def allowed(_batch_id: int, sent: Any) -> list[int]:
        return enforcer.get_allowed_tokens(sent.tolist()).allowed_tokens

    return allowed
