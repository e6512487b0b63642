"""``web_search``: text search through an HTTP back-end with a SearxNG-style JSON API.

``GET {base_url}/search?q=...&format=json`` answers ``{"results": [{"title", "content",
"url"}, ...]}``: SearxNG does, and so can a thin proxy in front of any paid search API.
The API key (if any) is read from the environment variable named in the options when a
request is made, sent as a header, and never logged or put in an error message. Transient
failures (timeouts, connection errors, HTTP 429 and 5xx) are retried with exponential
backoff; a per-run quota bounds the queries one retriever instance may send.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import Availability, Passage, Retriever
from mmat_assets.hookspecs import Register, hookimpl

RETRY_STATUS = {429, 500, 502, 503, 504}


class QuotaExceededError(RuntimeError):
    """The run sent as many queries as its quota allows."""


class WebSearchError(RuntimeError):
    """The back-end could not answer (after retries) or answered something unusable."""


class WebSearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_url: str | None = Field(default=None,
                                 description="Search back-end, e.g. http://127.0.0.1:8888.")
    api_key_env: str | None = Field(
        default=None, description="Name of the environment variable holding the API key "
        "(the key itself never goes in the config).",
    )
    api_key_header: str = Field(default="Authorization",
                                description="Header carrying the key ('Bearer <key>' for "
                                "Authorization, the bare key for any other header).")
    timeout_s: float = Field(default=10.0, gt=0, description="Timeout of one request.")
    retries: int = Field(default=2, ge=0, description="Retries after a transient failure.")
    backoff_s: float = Field(default=0.5, ge=0,
                             description="First retry delay; doubles with each retry.")
    quota: int | None = Field(default=None, ge=0,
                              description="Most queries this run may send (None: no limit).")
    params: dict[str, str] = Field(default_factory=dict,
                                   description="Extra query parameters (language, categories).")


class WebSearchRetriever(Retriever[WebSearchOptions]):
    """Web search over a SearxNG-style JSON API, with retries and a per-run quota."""

    name = "web_search"
    version = "1.0.0"
    description = "Web search through a SearxNG-compatible JSON API."

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.queries_sent = 0
        self.requests_sent = 0
        self._lock = threading.Lock()

    def availability(self) -> Availability:
        if not self.options.base_url:
            return Availability(False, "no search back-end configured (option base_url)")
        env = self.options.api_key_env
        if env and not os.environ.get(env):
            return Availability(False, f"environment variable {env} (API key) is not set")
        return Availability(True)

    def search(self, query: str, k: int = 3) -> list[Passage]:
        query = " ".join(query.split())
        if not query or k < 1:
            return []
        avail = self.availability()
        if not avail.ok:
            raise WebSearchError(avail.reason)
        self._take_quota()
        payload = self._get_json(self._url(query))
        return _passages(payload, k)

    def _take_quota(self) -> None:
        with self._lock:
            quota = self.options.quota
            if quota is not None and self.queries_sent >= quota:
                raise QuotaExceededError(f"web_search quota of {quota} queries for this run "
                                         "is used up")
            self.queries_sent += 1

    def _url(self, query: str) -> str:
        params = {**self.options.params, "q": query, "format": "json"}
        base = str(self.options.base_url).rstrip("/")
        return f"{base}/search?{urllib.parse.urlencode(params)}"

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "mmat-web-search"}
        env = self.options.api_key_env
        key = os.environ.get(env, "") if env else ""
        if key:
            header = self.options.api_key_header
            headers[header] = f"Bearer {key}" if header.lower() == "authorization" else key
        return headers

    def _get_json(self, url: str) -> Any:
        delay = self.options.backoff_s
        last = "no attempt"
        for attempt in range(self.options.retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            try:
                return self._once(url)
            except _TransientError as exc:
                last = str(exc)
        raise WebSearchError(f"search back-end failed after {self.options.retries + 1} "
                             f"attempts: {last}")

    def _once(self, url: str) -> Any:
        request = urllib.request.Request(url, headers=self._headers())
        with self._lock:
            self.requests_sent += 1
        try:
            with urllib.request.urlopen(request, timeout=self.options.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code in RETRY_STATUS:
                raise _TransientError(f"HTTP {exc.code}") from None
            raise WebSearchError(f"search back-end answered HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _TransientError(f"{type(exc).__name__}: {reason}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise WebSearchError("search back-end did not answer JSON") from None


class _TransientError(Exception):
    """A failure worth retrying."""


def _passages(payload: Any, k: int) -> list[Passage]:
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        raise WebSearchError("search back-end answer has no 'results' list")
    out = []
    for rank, item in enumerate(r for r in results if isinstance(r, dict)):
        text = str(item.get("content") or item.get("snippet") or "").strip()
        if not text:
            continue
        score = item.get("score")
        if not isinstance(score, (int, float)):
            score = 1.0 / (rank + 1)  # no engine score: reciprocal rank keeps the order
        out.append(Passage(text=text, title=str(item.get("title") or ""),
                           source=str(item.get("url") or ""), score=float(score)))
        if len(out) == k:
            break
    return out


@hookimpl
def register_retrievers(register: Register) -> None:
    register(WebSearchRetriever)
