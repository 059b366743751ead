"""A small Python client for a raylm server (standard library only).

It speaks the same OpenAI-style routes as the `openai` package, plus one thing that matters when
replicas come and go: a 503 (a replica lost twice in a row, or every replica's queue full) is
retried once after the server's Retry-After, so a single replica failure costs a caller nothing.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

MAX_RETRY_WAIT_S = 5.0


class ServerError(Exception):
    """An HTTP error answer: `status` and the server's OpenAI-style `body` (`{"error": {...}}`)."""

    def __init__(self, status: int, body: dict[str, Any], retry_after_s: float | None = None):
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status}: {message or body}")
        self.status, self.body, self.retry_after_s = status, body, retry_after_s


class Client:
    """`Client("http://127.0.0.1:8000", api_key=...)`; `.completion()`, `.chat()`, `.classify()`,
    `.ner()`, `.models()`.

    `retries` is how many times a 503 is retried (default once); `retried` counts retries made.
    """

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0, retries: int = 1
    ):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key, self.timeout_s, self.retries = api_key, timeout_s, retries
        self.retried = 0

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base_url + path, data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {"error": {"message": raw.decode("utf-8", "replace")[:500]}}
            try:
                retry_after = float(err.headers.get("Retry-After", ""))
            except ValueError:
                retry_after = None
            raise ServerError(err.code, parsed, retry_after) from None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One API call; retries a 503 up to `retries` times. Raises ServerError otherwise."""
        for attempt in range(self.retries + 1):
            try:
                return self._send(method, path, body)
            except ServerError as exc:
                if exc.status != 503 or attempt == self.retries:
                    raise
                self.retried += 1
                wait = exc.retry_after_s if exc.retry_after_s is not None else 1.0
                time.sleep(min(max(wait, 0.0), MAX_RETRY_WAIT_S))
        raise AssertionError("unreachable")

    def completion(
        self,
        prompt: str | list[str] | list[int] | list[list[int]] | None,
        model: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """POST /v1/completions; returns the response body. `params` are OpenAI's (n, logprobs,
        echo, best_of, logit_bias, ...; README "OpenAI parameters"). For streams, use the
        `openai` package."""
        _no_stream(params)
        body = {"prompt": prompt, **params, **({"model": model} if model else {})}
        return self.request("POST", "/v1/completions", body)

    def chat(
        self, messages: list[dict[str, Any]], model: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """POST /v1/chat/completions; returns the response body. `params` as for
        `completion` (response_format, logprobs, top_logprobs, ...)."""
        _no_stream(params)
        body = {"messages": messages, **params, **({"model": model} if model else {})}
        return self.request("POST", "/v1/chat/completions", body)

    def classify(self, texts: str | list[str], model: str | None = None) -> dict[str, Any]:
        """POST /v1/classify (a sequence classifier): a label and class scores per text."""
        return self.request(
            "POST", "/v1/classify", {"input": texts, **({"model": model} if model else {})}
        )

    def ner(self, texts: str | list[str], model: str | None = None) -> dict[str, Any]:
        """POST /v1/ner (a token classifier): entities with character offsets per text."""
        return self.request(
            "POST", "/v1/ner", {"input": texts, **({"model": model} if model else {})}
        )

    def models(self) -> list[str]:
        """The served model names."""
        return [m["id"] for m in self.request("GET", "/v1/models")["data"]]


def _no_stream(params: dict[str, Any]) -> None:
    if params.get("stream"):
        raise ValueError(
            "raylm.client returns whole answers; for stream=True use the openai package "
            "(OpenAI(base_url=URL + '/v1'))"
        )
