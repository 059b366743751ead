"""API keys: the gateway holds only a key's SHA-256 and compares fixed-length digests in
constant time, so neither the key nor its length can leak through timing or logs. Pure Python
(hashlib, hmac): `raylm serve` checks a key before anything imports Ray."""

from __future__ import annotations

import hashlib
import hmac

# The comparison every check uses (constant time for equal-length inputs).
compare = hmac.compare_digest


def key_digest(key: str) -> str:
    """SHA-256 of an API key, as 64 hex characters whatever the key's length."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_key(authorization: str, digest: str | None) -> bool:
    """Whether an `Authorization` header value carries the key whose digest is `digest`
    (`Bearer KEY`, scheme case-insensitive); always True when no key is configured."""
    if digest is None:
        return True
    scheme, _, token = authorization.partition(" ")
    # Digest first, scheme after: the time taken does not depend on which part is wrong.
    matches = compare(key_digest(token.strip()), digest)
    return matches and scheme.lower() == "bearer"
