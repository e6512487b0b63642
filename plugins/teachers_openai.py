"""``openai``: a teacher behind any OpenAI-compatible chat-completions endpoint, on the
official ``openai`` SDK (``AsyncOpenAI`` / ``AsyncAzureOpenAI``) over its aiohttp transport.

GPT-4o by default; the same code talks to vLLM, the llama.cpp server, ``transformers
serve`` and Azure OpenAI by changing ``base_url`` (and ``api_version`` for Azure). Images in
request messages (``{"type": "image", "path": ...}``) are downsized and sent inline as PNG
data URLs, so the server never needs to read our storage.

The SDK does the transport: connection pooling, timeouts, retries of 408/409/429/5xx,
timeouts and dropped connections (``max_retries``), honouring ``Retry-After`` /
``retry-after-ms``. This module adds what it does not do: structured output degrades from
``json_schema`` to ``json_object`` to plain prompting when a server rejects it; replies that
should be JSON are repaired locally, then re-asked once, before the row is given up as
``unparseable``; every call is priced; every failure leaves as :class:`TeacherError` with a
reason (``auth`` for 401/403, which stops the stage); and the API key is scrubbed from every
reply and message this module produces.

The API key comes from the ``api_key`` option (excluded from dumps and reprs) or from the
environment variable named by ``api_key_env``, read when a client is built for an event loop.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import functools
import importlib.util
import io
import ipaddress
import json
import logging
import os
import random
import re
import ssl
import threading
import time
import weakref
from collections.abc import AsyncIterator, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mmat_assets.contracts import Availability, Teacher, TeacherError, TeacherReply, TeacherRequest
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.ratelimit import AdaptiveLimiter
from mmat_assets.toolkit.batch import BatchCollector, BatchLimits, BatchStats

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)
T = TypeVar("T")

JsonMode = Literal["schema", "json_object_schema", "json_object", "none"]
JSON_MODES: tuple[JsonMode, ...] = ("schema", "json_object_schema", "json_object", "none")
#: Request ``params`` forwarded to the server; anything else only shapes the cache key.
FORWARDED_PARAMS = ("temperature", "max_tokens", "max_completion_tokens", "top_p", "seed", "stop",
                    "presence_penalty", "frequency_penalty")
STATUS_REASONS = {408: "timeout", 429: "rate_limited", 401: "auth", 403: "auth"}
LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}
#: The header the SDK puts on every attempt of one request: how many retries came before it.
RETRY_COUNT_HEADER = "x-stainless-retry-count"
#: The SDK does not retry at all when a server asks to wait longer than this.
MAX_RETRY_AFTER_S = 120.0
CHAT_PATH = "/chat/completions"


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_per_1k: float = Field(ge=0, description="USD per 1,000 prompt tokens.")
    output_per_1k: float = Field(ge=0, description="USD per 1,000 completion tokens.")


def default_prices() -> dict[str, ModelPrice]:
    """OpenAI list prices (USD) of the default models; dated snapshots match by prefix."""
    return {
        "gpt-4o": ModelPrice(input_per_1k=0.0025, output_per_1k=0.01),
        "gpt-4o-mini": ModelPrice(input_per_1k=0.00015, output_per_1k=0.0006),
    }


class BatchOptions(BaseModel):
    """How ``mode: batch`` cuts, polls and retries batches (see mmat_assets.toolkit.batch)."""

    model_config = ConfigDict(extra="forbid")
    max_requests: int = Field(default=50_000, ge=1, description="Most requests in one batch "
                              "(the provider's limit); a larger turn goes out as several batches.")
    max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024, description="Largest batch input "
                           "file in bytes (the provider's limit).")
    price_factor: float = Field(default=0.5, ge=0, description="Batch price as a fraction of the "
                                "price table (OpenAI charges half).")
    collect_s: float = Field(default=5.0, gt=0, description="A turn leaves once every live row "
                             "waits on it, or once no request has joined for this long (rows the "
                             "engine does not count, rows still running tools).")
    poll_s: float = Field(default=15.0, gt=0, description="First wait between status polls; it "
                          "grows by half each poll.")
    poll_max_s: float = Field(default=300.0, gt=0, description="Longest wait between status polls.")
    resubmits: int = Field(default=2, ge=0, description="Submissions again of an expired or "
                           "failed item (or of every item of a failed batch) before its row is "
                           "quarantined as batch_expired / batch_failed.")
    completion_window: str = Field(default="24h", description="The batch's completion window.")


class OpenAIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["online", "batch"] = Field(
        default="online", description="'online' sends each request as it comes; 'batch' sends "
        "turn k of every live row of a shard as one Batch API job (files + batches), at the "
        "batch price, and resumes polling after a kill. Sync callers (tools) stay online.")
    batch: BatchOptions = Field(default_factory=BatchOptions, description="Batch mode's limits, "
                                "polling, resubmissions and price.")
    base_url: str = Field(default="https://api.openai.com/v1",
                          description="Endpoint root; the SDK appends '/chat/completions'.")
    model: str = Field(default="gpt-4o", description="Model (or Azure deployment) name sent "
                       "with every request; part of every request's cache key.")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Name of the environment "
                             "variable holding the API key, read when a request is made.")
    api_key: SecretStr | None = Field(
        default=None, exclude=True, repr=False,
        description="The API key itself, for wiring that resolves secrets elsewhere; never "
        "dumped or shown. Takes precedence over api_key_env.",
    )
    auth_header: Literal["authorization", "api-key"] = Field(
        default="authorization", description="'authorization' sends 'Bearer <key>'; 'api-key' "
        "sends the key in an 'api-key' header (Azure OpenAI; implied by api_version).",
    )
    api_version: str | None = Field(default=None, description="Azure OpenAI: the 'api-version' "
                                    "query parameter. Set, the teacher uses AsyncAzureOpenAI, which "
                                    "addresses '<base_url>/deployments/<model>' unless base_url "
                                    "already names a deployment.")
    vision: bool = Field(default=True, description="Whether the model can look at images.")
    max_image_side: int = Field(default=768, ge=16, description="Images are downsized to "
                                "this longest side before being sent as data URLs.")
    concurrency: int = Field(default=16, ge=1, description="Requests in flight at once "
                             "(per event loop; sync callers in all threads share one limit). "
                             "With adaptive_concurrency, the ceiling the teacher starts at.")
    adaptive_concurrency: bool = Field(
        default=True, description="Adapt the requests in flight to the provider's rate limit "
        "(AIMD): halve them on a 429, grow back by one per window of successes, and hold new "
        "requests while the x-ratelimit-remaining-* headers say the budget is spent. Shared by "
        "all event loops of this teacher, so parallel runs settle near the provider's limit.",
    )
    min_concurrency: int = Field(default=1, ge=1, description="The fewest requests in flight "
                                 "adaptive concurrency cuts down to (at most concurrency).")
    timeout_s: float = Field(default=120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(default=5, ge=0, description="The SDK's retries of one request "
                             "after 408, 409, 429, 5xx, timeouts and connection errors.")
    backoff_base_s: float = Field(default=0.5, ge=0, description="First backoff ceiling when "
                                  "the server sends no Retry-After; it doubles per retry, and "
                                  "the wait is drawn below it.")
    backoff_max_s: float = Field(default=60.0, ge=0, description="Largest backoff between "
                                 "retries. A server's Retry-After (up to the SDK's 120 s) is "
                                 "honoured as sent.")
    json_mode: JsonMode = Field(
        default="schema", description="How JSON is asked for when a request has a schema: "
        "'schema' (response_format json_schema), 'json_object_schema' (json_object carrying "
        "the schema, the llama-cpp-python server's form of schema-constrained output), "
        "'json_object', or 'none' (prompt only). A server that rejects it with HTTP 400 moves "
        "this teacher one step down to 'json_object', then 'none', for good.",
    )
    strict_schema: bool = Field(
        default=False, description="Send json_schema with strict=true, so OpenAI enforces "
        "the schema exactly (every object needs additionalProperties false and all "
        "properties required).",
    )
    repair_attempts: int = Field(
        default=2, ge=0, description="Repairs of a reply that should be JSON and is not: "
        "the first is local (code fences, surrounding text, trailing commas, single "
        "quotes), each further one re-asks the model with the parse error.",
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=default_prices, description="Model name -> USD per 1k input and "
        "output tokens; the longest matching prefix of the answering model wins.",
    )
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature "
                               "unless the request's params set one.")
    max_tokens: int | None = Field(default=None, ge=1, description="Completion token limit "
                                   "unless the request's params set one.")


# ------------------------------------------------------------------------- the teacher


@dataclass
class _Call:
    """One logical request as it travels through fallbacks and repairs."""

    messages: list[dict[str, Any]]
    schema: dict[str, Any] | None
    wants_json: bool
    params: dict[str, Any]
    #: Structured-output mode for this call; steps down on a 400 and is remembered by
    #: the teacher only once a lower mode has worked.
    json_mode: JsonMode = "schema"
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    #: batch mode: the request's hash (its first body's custom_id) and bodies sent so far
    key: str = ""
    sends: int = 0


class _Fallback(Exception):
    """A 400 to a request that carried response_format: try the next lower JSON mode."""


@dataclass
class _Session:
    """The SDK client and concurrency limit of one event loop (aiohttp is loop-bound)."""

    client: openai.AsyncOpenAI
    gate: asyncio.Semaphore
    #: closes the client when its loop shuts down (see OpenAITeacher._session)
    keeper: Any = None


class OpenAITeacher(Teacher[OpenAIOptions]):
    """GPT-4o, or any OpenAI-compatible chat-completions server, as a teacher."""

    name = "openai"
    version = "1.0.0"
    description = ("Any OpenAI-compatible chat-completions endpoint (OpenAI, Azure, vLLM, "
                   "llama.cpp server, transformers serve); GPT-4o by default.")

    def __init__(self, options: BaseModel | Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        if isinstance(options, OpenAIOptions):
            # The base class round-trips options through model_dump, which drops the key.
            self.options = options.model_copy()
        self.model = self.options.model
        self.vision = self.options.vision
        self._json_mode: JsonMode = self.options.json_mode
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        """Loop-bound clients and the sync callers' limit: never copied, rebuilt on demand."""
        self._sessions: dict[asyncio.AbstractEventLoop, _Session] = {}
        self._sync_gate = threading.BoundedSemaphore(self.options.concurrency)
        o = self.options
        self._limiter = (AdaptiveLimiter(o.concurrency, minimum=min(o.min_concurrency, o.concurrency))
                         if o.adaptive_concurrency else None)
        self._collectors: dict[asyncio.AbstractEventLoop, BatchCollector] = {}
        #: each shard's batch counts, by its request cache: one shard's stages add up
        self._shard_stats: weakref.WeakKeyDictionary[Any, BatchStats] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        # Executors may pickle or copy resources; sockets and semaphores cannot travel.
        state = self.__dict__.copy()
        for key in ("_sessions", "_sync_gate", "_limiter", "_collectors", "_shard_stats"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.options.base_url!r})"

    @property
    def json_mode(self) -> JsonMode:
        """The structured-output mode in use now (lower than configured after a fallback)."""
        return self._json_mode

    # ------------------------------------------------------------- availability, key

    def availability(self) -> Availability:
        for package in ("openai", "aiohttp"):
            if importlib.util.find_spec(package) is None:
                return Availability(False, f"the {package} package is not installed "
                                    "(pip install 'openai[aiohttp]')")
        if not self._api_key() and not is_loopback(self.options.base_url):
            return Availability(False, f"no API key: set ${self.options.api_key_env} "
                                f"(or the api_key option) to call {self.options.base_url}")
        return Availability(True)

    def _api_key(self) -> str:
        if self.options.api_key is not None:
            return self.options.api_key.get_secret_value()
        return os.environ.get(self.options.api_key_env, "")

    def _scrub(self, text: str) -> str:
        """Remove the key from any text leaving this module: error details, log lines and
        every reply, successful ones too (a server or a model may echo it back, and a reply
        is stored in the request cache, the tables and the exports). JSON replies are
        normalised text, so the key's JSON-escaped form is removed as well."""
        key = self._api_key()
        if len(key) < 4:
            return text
        return text.replace(key, "***").replace(json.dumps(key, ensure_ascii=False)[1:-1], "***")

    def _error(self, reason: str, detail: str) -> TeacherError:
        return TeacherError(reason, self._scrub(detail))

    # ------------------------------------------------------------- public entry points

    def complete(self, request: TeacherRequest | Mapping[str, Any]) -> TeacherReply:
        """Sync form of :meth:`acomplete` for callers in worker threads (the caption tool,
        a judge's ``score``); all sync callers share one ``concurrency`` limit."""
        with self._sync_gate:
            # Online even in batch mode: a tool waits on it inside a row's turn.
            return run_sync(self._complete(as_request(request), batch=False))

    async def acomplete(self, request: TeacherRequest | Mapping[str, Any]) -> TeacherReply:
        return await self._complete(as_request(request), batch=self.batched)

    async def _complete(self, request: TeacherRequest, batch: bool) -> TeacherReply:
        started = time.perf_counter()
        call = await self._prepare(request)
        if batch:
            call.key = request.fingerprint(self.model)
        content = self._scrub(await self._answer(call))  # scrubbed before anyone stores it
        return self._reply(call, content, time.perf_counter() - started)

    # ------------------------------------------------------------- batch mode

    @property
    def batched(self) -> bool:  # type: ignore[override]
        return self.options.mode == "batch"

    def rows_live(self, count: int, store: Any = None) -> None:
        if not self.batched:
            return
        collector = self._collector()
        if store is not None and collector.store is not store:
            collector.stats = self._shard_stats.setdefault(store, collector.stats)
        collector.set_live(count, store)

    def shard_metadata(self, store: Any = None) -> dict[str, Any]:
        stats = self._shard_stats.get(store) if store is not None else None
        return stats.as_metadata() if self.batched and stats is not None else {}

    def _collector(self) -> BatchCollector:
        """The batch queue of the running loop (one shard), built on first use."""
        loop = asyncio.get_running_loop()
        collector = self._collectors.get(loop)
        if collector is None:
            for old in [k for k in self._collectors if k.is_closed()]:
                del self._collectors[old]
            b = self.options.batch
            endpoint = CHAT_PATH if self.options.api_version else "/v1" + CHAT_PATH
            limits = BatchLimits(b.max_requests, b.max_bytes, b.collect_s, b.poll_s, b.poll_max_s,
                                 b.resubmits, endpoint)
            collector = self._collectors[loop] = BatchCollector(_Batches(self), limits)
        return collector

    async def _post_batch(self, call: _Call, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion through the shard's next batch; the response body, or TeacherError."""
        # Re-asks and JSON-mode fallbacks are further bodies of one request: numbered, so a
        # rerun asks them under the same custom_id.
        custom_id = call.key if not call.sends else f"{call.key}.{call.sends}"
        call.sends += 1
        try:
            result = await self._collector().send(custom_id, body)
        except TeacherError as exc:  # the provider's words may echo the key
            raise self._error(exc.reason, str(exc)) from None
        call.attempts += 1
        if result.status_code != 200:
            raise self._status_failure(_BatchResponse(result.status_code, json.dumps(result.body)),
                                       "response_format" in body)
        return result.body

    async def aclose(self) -> None:
        """Close the SDK client bound to the running event loop (it is also closed when
        that loop shuts down)."""
        session = self._sessions.get(asyncio.get_running_loop())
        if session is not None and session.keeper is not None:
            await session.keeper.aclose()

    def close(self) -> None:
        """Nothing outlives a sync call: each one's client closes with its own loop."""

    # ------------------------------------------------------------- request building

    async def _prepare(self, request: TeacherRequest) -> _Call:
        if not self.vision and has_images(request.messages):
            raise self._error("unsupported", f"model {self.model!r} is configured without vision "
                              "but the request holds images")
        # Encoding images reads and resizes files: off the loop, but only when there are some.
        messages = (await asyncio.to_thread(self._encode_messages, request.messages)
                    if has_images(request.messages) else self._encode_messages(request.messages))
        wants = request.json_schema is not None or _asks_json_object(request.params)
        params = {k: request.params[k] for k in FORWARDED_PARAMS if k in request.params}
        return _Call(messages, request.json_schema, wants, params, json_mode=self._json_mode)

    def _encode_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return [self._encode_message(m) for m in messages]
        except (OSError, ValueError) as exc:
            raise self._error("unsupported", f"cannot read an image of the request: {exc}") from exc

    def _encode_message(self, message: Mapping[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if not isinstance(content, list):
            return dict(message)
        if not self.vision and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
            # A text-only server's chat template expects a string: llama.cpp's fail on a list.
            return {**message, "content": "\n".join(str(p.get("text") or "") for p in content)}
        return {**message, "content": [self._encode_part(p) for p in content]}

    def _encode_part(self, part: Mapping[str, Any]) -> dict[str, Any]:
        # Parts are rebuilt, not copied: strict servers reject keys of ours such as sha256.
        if part.get("type") == "text":
            return {"type": "text", "text": str(part.get("text") or "")}
        if part.get("type") != "image":
            return dict(part)
        if part.get("path"):
            path = self.resolve_path(str(part["path"]))
            url = image_data_url(str(path), path.stat().st_mtime_ns, self.options.max_image_side)
        elif part.get("data"):
            url = bytes_data_url(part["data"], self.options.max_image_side)
        else:
            raise ValueError("image part has neither a path nor data")
        return {"type": "image_url", "image_url": {"url": url}}

    def _body(self, call: _Call, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "temperature": self.options.temperature}
        if self.options.max_tokens is not None:
            body["max_tokens"] = self.options.max_tokens
        body.update(call.params)
        response_format = self._response_format(call)
        if response_format is not None:
            body["response_format"] = response_format
        return body

    def _response_format(self, call: _Call) -> dict[str, Any] | None:
        if not call.wants_json or call.json_mode == "none":
            return None
        if call.json_mode == "schema" and call.schema is not None:
            name = re.sub(r"[^A-Za-z0-9_-]", "_", str(call.schema.get("title") or "reply"))[:64]
            return {"type": "json_schema",
                    "json_schema": {"name": name, "schema": call.schema,
                                    "strict": self.options.strict_schema}}
        if call.json_mode == "json_object_schema" and call.schema is not None:
            return {"type": "json_object", "schema": call.schema}
        return {"type": "json_object"}

    # ------------------------------------------------------------- answering, repair

    async def _answer(self, call: _Call) -> str:
        messages = call.messages
        content = await self._chat(call, messages)
        if not call.wants_json:
            return content
        try:
            return normalise_json(parse_object(content))
        except ValueError as exc:
            error = str(exc)
        if self.options.repair_attempts >= 1:
            repaired = repair_json(content)
            if repaired is not None:
                return normalise_json(repaired)
        for _ in range(self.options.repair_attempts - 1):
            messages = [*messages, {"role": "assistant", "content": content},
                        {"role": "user", "content": reask_prompt(error, call.schema)}]
            content = await self._chat(call, messages)
            obj = parse_object(content, strict=False) or repair_json(content)
            if obj is not None:
                return normalise_json(obj)
            error = _parse_error(content)
        raise self._error("unparseable", f"reply is not a JSON object ({error}): {content[:300]!r}")

    async def _chat(self, call: _Call, messages: list[dict[str, Any]]) -> str:
        """One chat completion (the SDK retries it), stepping the JSON mode down on a 400."""
        while True:
            body = self._body(call, messages)
            try:
                data = await self._post(call, body)
            except _Fallback:
                # A 400 may be about response_format or about anything else; stepping down
                # for this call tells which, without trusting each server's error wording.
                sent = body["response_format"]
                call.json_mode = "none" if sent["type"] == "json_object" and "schema" not in sent else "json_object"
                continue
            self._remember_mode(call.json_mode)
            return self._take(call, data)

    def _take(self, call: _Call, data: Mapping[str, Any]) -> str:
        """Count a completion's tokens and model into ``call``; its message text."""
        call.model = str(data.get("model") or call.model)
        usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
        call.prompt_tokens += _count(usage.get("prompt_tokens"))
        call.completion_tokens += _count(usage.get("completion_tokens"))
        return self._message_text(data)

    def _message_text(self, data: Mapping[str, Any]) -> str:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._error("http_error", f"not a chat completion: {json.dumps(data)[:300]}")
        choice = choices[0]
        message: dict[str, Any] = choice["message"] if isinstance(choice.get("message"), dict) else {}
        if message.get("refusal") or choice.get("finish_reason") == "content_filter":
            why = message.get("refusal") or "the server's content filter stopped the reply"
            raise self._error("refusal", f"{self.model} refused: {str(why)[:300]}")
        return str(message.get("content") or "")

    def _remember_mode(self, mode: JsonMode) -> None:
        if JSON_MODES.index(mode) > JSON_MODES.index(self._json_mode):
            log.warning("%s rejects response_format modes above %r; using it from now on",
                        self.options.base_url, mode)
            self._json_mode = mode

    def _reply(self, call: _Call, content: str, latency_s: float) -> TeacherReply:
        return TeacherReply(content=content, prompt_tokens=call.prompt_tokens,
                            completion_tokens=call.completion_tokens, cost_usd=self._cost(call),
                            model=self._scrub(call.model or self.model), attempts=call.attempts,
                            latency_s=latency_s)

    # ------------------------------------------------------------- the SDK

    async def _post(self, call: _Call, body: dict[str, Any]) -> dict[str, Any]:
        """POST one chat completion through the SDK; the decoded body, or TeacherError."""
        if call.key:
            return await self._post_batch(call, body)
        import httpx2
        import openai

        session = await self._session()
        try:
            async with session.gate, self._limiter.slot() if self._limiter else contextlib.nullcontext():
                # The plain JSON body goes out as it is: ``chat.completions.create`` would walk
                # every message through the SDK's TypedDict transform (half its CPU per request)
                # and parse the reply into pydantic models only to be dumped again here.
                resp = await session.client.post(CHAT_PATH, body=body, cast_to=httpx2.Response,
                                                 options=self._request_options())  # type: ignore[call-overload]
        except openai.APIStatusError as exc:
            call.attempts += _attempts(exc.response.request)
            if exc.response.status_code == 429:  # the last attempt's; the SDK saw the others
                session.client.note_429(exc.response)  # type: ignore[attr-defined]
            raise self._status_failure(exc.response, "response_format" in body) from None
        except openai.APIConnectionError as exc:  # APITimeoutError included
            call.attempts += _attempts(exc.request)
            raise self._connection_failure(exc, call.attempts) from None
        call.attempts += _attempts(resp.request)
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._error("http_error", f"HTTP {resp.status_code} but not a chat completion: {resp.text[:300]}")
        if self._limiter is not None:
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            self._limiter.succeeded(resp.headers, _count(usage.get("total_tokens")))  # type: ignore[union-attr]
        return data

    def _connection_failure(self, exc: Exception, attempts: int) -> TeacherError:
        # The aiohttp transport reports a refused connection as a connect *timeout*; what
        # really happened is at the bottom of the exception chain.
        root = _root_cause(exc)
        if isinstance(root, TimeoutError):
            return self._error("timeout", f"no reply within {self.options.timeout_s}s from "
                               f"{self.options.base_url} ({_tries(attempts)})")
        return self._error("http_error", f"connection failed: {type(root).__name__}: {root} "
                           f"({_tries(attempts)})")

    def _status_failure(self, resp: Any, sent_format: bool) -> Exception:
        status = int(resp.status_code)
        if status == 400 and sent_format:
            return _Fallback()
        detail = f"HTTP {status} from {self.options.base_url}: {resp.text[:300]}"
        reason = STATUS_REASONS.get(status, "http_error")  # auth: every other request would fail too
        return self._error(reason, detail)

    def _request_options(self) -> dict[str, Any]:
        """Per-request headers where the SDK's own auth does not fit: none at all for a local
        server without a key (the SDK insists on some), or the key in an 'api-key' header
        outside Azure."""
        from openai import omit

        key = self._api_key()
        if not key:
            return {"headers": {"Authorization": omit, "api-key": omit}}
        if self.options.auth_header == "api-key" and not self.options.api_version:
            return {"headers": {"api-key": key, "Authorization": omit}}
        return {}

    async def _session(self) -> _Session:
        """The SDK client and concurrency limit of the running loop, built on first use.

        A client lives as long as its loop: an async generator registered with the loop
        closes it when the loop shuts its generators down (``asyncio.run`` does, at the end
        of every shard and of every sync call), so no caller has to remember to.
        """
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None:
            for old in [k for k in self._sessions if k.is_closed()]:  # loops ended without shutdown
                del self._sessions[old]
            session = _Session(self._client(), asyncio.Semaphore(self.options.concurrency))
            session.keeper = self._keep(loop, session.client)
            self._sessions[loop] = session
            await session.keeper.__anext__()  # the first step registers it with the loop
        return session

    async def _keep(self, loop: asyncio.AbstractEventLoop, client: openai.AsyncOpenAI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if self._sessions.get(loop) is not None and self._sessions[loop].client is client:
                del self._sessions[loop]
            await client.close()

    def _client(self) -> openai.AsyncOpenAI:
        import httpx2
        import openai

        o = self.options
        connections = max(o.concurrency, 1)
        http = openai.DefaultAioHttpClient(
            timeout=httpx2.Timeout(o.timeout_s), verify=tls_context(),
            limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections))
        key = self._api_key() or "no-key"  # never sent: see _request_options
        common: dict[str, Any] = {"api_key": key, "max_retries": o.max_retries, "timeout": o.timeout_s,
                                  "http_client": http}
        plain, azure = sdk_classes()
        if o.api_version:
            client: openai.AsyncOpenAI = azure(base_url=o.base_url, api_version=o.api_version, **common)
        else:
            client = plain(base_url=o.base_url, **common)
        client.backoff = self._backoff  # type: ignore[attr-defined]
        client.throttled = self._limiter.throttled if self._limiter else None  # type: ignore[attr-defined]
        client.requeue = self._limiter.requeue if self._limiter else None  # type: ignore[attr-defined]
        return client

    def _backoff(self, retry: int) -> float:
        """Full jitter below an exponential ceiling, for retries without a Retry-After."""
        ceiling = min(self.options.backoff_max_s, self.options.backoff_base_s * 2 ** (retry - 1))
        return random.uniform(0, ceiling)

    # ------------------------------------------------------------- prices

    def _cost(self, call: _Call) -> float:
        """USD for every call made for one request (re-asks included); 0 for unknown models."""
        price = self._price(call.model or self.model)
        if price is None:
            return 0.0
        factor = self.options.batch.price_factor if call.key else 1.0
        return factor * (call.prompt_tokens * price.input_per_1k
                         + call.completion_tokens * price.output_per_1k) / 1000

    def _price(self, model: str) -> ModelPrice | None:
        matches = [k for k in self.options.prices if model == k or model.startswith(k)]
        if not matches and model != self.model:
            return self._price(self.model)
        return self.options.prices[max(matches, key=len)] if matches else None


# ----------------------------------------------------------------------- Batch API


@dataclass
class _BatchResponse:
    """A batch item's HTTP status and body, shaped like the SDK's response for
    :meth:`OpenAITeacher._status_failure`."""

    status_code: int
    text: str


class _Batches:
    """The Batch API through the teacher's SDK client (``files`` and ``batches``), SDK errors
    turned into the teacher's reasons."""

    def __init__(self, teacher: OpenAITeacher) -> None:
        self.teacher = teacher

    async def _sdk(self, fn: Any, **kwargs: Any) -> Any:
        import openai

        session = await self.teacher._session()
        headers = self.teacher._request_options().get("headers")
        try:
            return await fn(session.client, **kwargs, **({"extra_headers": headers} if headers else {}))
        except openai.APIStatusError as exc:
            raise self.teacher._status_failure(exc.response, False) from None
        except openai.APIConnectionError as exc:
            raise self.teacher._connection_failure(exc, 1) from None

    async def upload(self, data: bytes) -> str:
        f = await self._sdk(lambda c, **kw: c.files.create(file=("batch.jsonl", data), purpose="batch", **kw))
        return str(f.id)

    async def create(self, file_id: str) -> str:
        o = self.teacher.options
        b = await self._sdk(lambda c, **kw: c.batches.create(
            input_file_id=file_id, endpoint="/v1" + CHAT_PATH if not o.api_version else CHAT_PATH,
            completion_window=o.batch.completion_window, metadata={"mmat_input_file": file_id}, **kw))
        return str(b.id)

    async def find(self, file_id: str) -> str | None:
        async def scan(c: Any, **kw: Any) -> str | None:
            async for b in c.batches.list(limit=100, **kw):
                if b.input_file_id == file_id:
                    return str(b.id)
            return None

        found: str | None = await self._sdk(scan)
        return found

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        b = await self._sdk(lambda c, **kw: c.batches.retrieve(batch_id, **kw))
        info: dict[str, Any] = b.model_dump()
        return info

    async def content(self, file_id: str) -> bytes:
        r = await self._sdk(lambda c, **kw: c.files.content(file_id, **kw))
        return bytes(r.content)


# ----------------------------------------------------------------------- SDK clients


class _Backoff:
    """The SDK's retry loop with this teacher's backoff: a server's ``Retry-After`` is
    honoured through the SDK's own parsing; without one, the wait is the teacher's."""

    backoff: Any  # (retry number) -> seconds
    throttled: Any = None  # (Retry-After seconds, headers) -> None: AdaptiveLimiter.throttled
    requeue: Any = None  # async (seconds) -> None: AdaptiveLimiter.requeue

    def _should_retry(self, response: Any) -> bool:
        # Called for every failed attempt the SDK may retry, inside the request's limiter slot.
        if response.status_code == 429:
            self.note_429(response)
        return bool(super()._should_retry(response))  # type: ignore[misc]

    async def _sleep_for_retry(self, *, retries_taken: int, max_retries: int, options: Any,
                               response: Any) -> None:
        # After a 429 the retry queues for a slot of the adaptive limit like a new request.
        if self.requeue is None or response is None or response.status_code != 429:
            return await super()._sleep_for_retry(  # type: ignore[misc]
                retries_taken=retries_taken, max_retries=max_retries, options=options, response=response)
        wait = self._calculate_retry_timeout(max_retries - retries_taken, options, response.headers)
        await self.requeue(wait)

    def note_429(self, response: Any) -> None:
        """Tell the adaptive limiter about a 429 and its ``Retry-After``."""
        if self.throttled is not None:
            self.throttled(self._parse_retry_after_header(response.headers), response.headers)  # type: ignore[attr-defined]

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any,
                                 response_headers: Any = None) -> float:
        retry_after = self._parse_retry_after_header(response_headers)  # type: ignore[attr-defined]
        if retry_after is not None and 0 < retry_after <= MAX_RETRY_AFTER_S:
            return float(retry_after)
        retry = options.get_max_retries(self.max_retries) - remaining_retries + 1  # type: ignore[attr-defined]
        return float(self.backoff(retry))


@functools.cache
def sdk_classes() -> tuple[type[openai.AsyncOpenAI], type[openai.AsyncAzureOpenAI]]:
    """``AsyncOpenAI`` and ``AsyncAzureOpenAI`` with :class:`_Backoff`; built on first use,
    since importing the SDK takes a while and most commands never call a teacher."""
    import openai

    class Client(_Backoff, openai.AsyncOpenAI):
        pass

    class AzureClient(_Backoff, openai.AsyncAzureOpenAI):
        pass

    return Client, AzureClient


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client: loading the CA bundle takes tens of ms, and sync
    callers build a client per call."""
    import httpx2

    return httpx2.create_ssl_context()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, with or without a running loop in this
    thread (a sync caller inside async code blocks its loop either way)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1, thread_name_prefix="openai-teacher") as pool:
        return pool.submit(asyncio.run, coro).result()


def _attempts(request: Any) -> int:
    """HTTP attempts the SDK made for one request, from the retry count it sent last."""
    try:
        return int(request.headers.get(RETRY_COUNT_HEADER, 0)) + 1
    except (AttributeError, TypeError, ValueError):
        return 1


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _tries(n: int) -> str:
    return f"after {n} attempt{'s' if n > 1 else ''}"


# ----------------------------------------------------------------------- pure helpers


def as_request(request: TeacherRequest | Mapping[str, Any]) -> TeacherRequest:
    """Accept a :class:`TeacherRequest` or the plain-dict form some callers build.

    A dict may carry ``response_format`` at top level; it moves into ``params`` so the
    teacher knows JSON was asked for.
    """
    if isinstance(request, TeacherRequest):
        return request
    params = dict(request.get("params") or {})
    if "response_format" in request:
        params["response_format"] = request["response_format"]
    return TeacherRequest(kind=str(request.get("kind") or "tool"),
                          messages=list(request["messages"]),
                          prompt_version=str(request.get("prompt_version") or ""),
                          json_schema=request.get("json_schema"), params=params)


def _asks_json_object(params: Mapping[str, Any]) -> bool:
    fmt = params.get("response_format")
    return isinstance(fmt, Mapping) and fmt.get("type") in {"json_object", "json_schema"}


def _count(value: Any) -> int:
    """A token count from a usage block; servers sometimes omit it or send null."""
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        return 0


def has_images(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list)
               and any(p.get("type") in {"image", "image_url"} for p in m["content"])
               for m in messages)


def is_loopback(base_url: str) -> bool:
    """Whether the URL points at this machine (a local server needs no key)."""
    host = (urlsplit(base_url).hostname or "").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=64)
def image_data_url(path: str, mtime_ns: int, max_side: int) -> str:
    """A PNG data URL of the image at ``path``, longest side at most ``max_side``.

    Cached by modification time: a dialogue sends the same image with every step.
    """
    from mmat_assets.toolkit.images import open_rgb

    return _png_data_url(open_rgb(path, max_side))


def bytes_data_url(data: bytes | str, max_side: int) -> str:
    """The same for an image given as bytes (or base64 text)."""
    from mmat_assets.toolkit.images import open_rgb

    raw = base64.b64decode(data) if isinstance(data, str) else data
    return _png_data_url(open_rgb(io.BytesIO(raw), max_side))


def _png_data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def normalise_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def parse_object(text: str, strict: bool = True) -> dict[str, Any] | None:
    """``text`` as a JSON object; raises ValueError (or returns None when not strict)."""
    try:
        obj = json.loads(text)
    except ValueError:
        if strict:
            raise
        return None
    if isinstance(obj, dict):
        return obj
    if strict:
        raise ValueError(f"JSON is a {type(obj).__name__}, not an object")
    return None


def _parse_error(text: str) -> str:
    try:
        parse_object(text)
    except ValueError as exc:
        return str(exc)
    return "no error"


FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*(.*?)```", re.S)
TRAILING_COMMA = re.compile(r",(\s*[}\]])")
JSON_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False,
                 "None": None}


def repair_json(text: str) -> dict[str, Any] | None:
    """Recover the JSON object in a sloppy reply, or None.

    Handles what small and chatty models do: code fences, prose around the object,
    trailing commas, raw line breaks inside strings, single quotes and Python literals
    (``True``/``None``).
    """
    for candidate in _candidates(text):
        for attempt in (candidate, TRAILING_COMMA.sub(r"\1", candidate)):
            obj = parse_object(attempt, strict=False) or _with_control_chars(attempt)
            if obj is not None:
                return obj
        obj = _python_literal(candidate)
        if obj is not None:
            return obj
    return None


def _with_control_chars(text: str) -> dict[str, Any] | None:
    """JSON whose strings hold raw control characters (a line break typed as is), which
    strict JSON forbids and grammar-constrained servers let through."""
    try:
        obj = json.JSONDecoder(strict=False).decode(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _candidates(text: str) -> list[str]:
    fenced = [m.group(1).strip() for m in FENCE.finditer(text)]
    out = []
    for chunk in [*fenced, text.strip()]:
        start, end = chunk.find("{"), chunk.rfind("}")
        if start != -1 and end > start:
            out.append(chunk[start:end + 1])
    return out


def _python_literal(text: str) -> dict[str, Any] | None:
    """Read a dict written with Python syntax or JSON literals, without evaluating code."""
    try:
        tree = ast.parse(text, mode="eval")
        obj = _literal(tree.body)
    except (SyntaxError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in JSON_LITERALS:
        return JSON_LITERALS[node.id]
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        return {str(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(f"not a literal: {type(node).__name__}")


def reask_prompt(error: str, schema: Mapping[str, Any] | None) -> str:
    """The follow-up turn that asks the model to resend its reply as valid JSON."""
    shape = f" matching this JSON schema:\n{json.dumps(schema)}" if schema else ""
    return (f"Your previous reply could not be parsed as JSON ({error}). Reply again with "
            f"only one valid JSON object{shape}\nNo code fences, no text outside the object.")


@hookimpl
def register_teachers(register: Register) -> None:
    register(OpenAITeacher)
