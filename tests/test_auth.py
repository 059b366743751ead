"""raylm.serving.auth: API keys are kept as SHA-256 digests and checked from the
`Authorization: Bearer KEY` header."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from raylm.serving.auth import check_key, compare, key_digest

KEY = "sk-test-123"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


def test_digest_is_sha256_hex_of_the_key_whatever_its_length():
    assert key_digest(KEY) == DIGEST
    assert len(key_digest("")) == 64
    assert len(key_digest("k" * 10_000)) == 64
    assert key_digest("a") != key_digest("b")


def test_unicode_keys_are_hashed_as_utf8():
    assert key_digest("clé") == hashlib.sha256("clé".encode()).hexdigest()


def test_comparison_is_constant_time_digest_comparison():
    assert compare is hmac.compare_digest


def test_no_configured_key_lets_everything_through():
    assert check_key("", None) is True
    assert check_key("Bearer anything", None) is True


@pytest.mark.parametrize(
    "header",
    [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"Bearer {KEY}  ", f"Bearer  {KEY}"],
)
def test_the_right_key_with_the_bearer_scheme_passes(header):
    assert check_key(header, DIGEST) is True


@pytest.mark.parametrize(
    "header",
    [
        "",
        KEY,
        f"Basic {KEY}",
        f"Token {KEY}",
        f"Bearer{KEY}",
        "Bearer sk-test-12",
        "Bearer sk-test-1234",
        "Bearer ",
        f"Bearer {DIGEST}",
    ],
)
def test_a_wrong_key_or_scheme_is_refused(header):
    assert check_key(header, DIGEST) is False
