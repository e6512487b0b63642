"""``openai``: a teacher behind any OpenAI-compatible chat-completions endpoint.

GPT-4o by default; the same code talks to vLLM, the llama.cpp server, ``transformers
serve`` and Azure OpenAI by changing ``base_url`` (and ``auth_header`` / ``api_version`` for
Azure). Images in request messages (``{"type": "image", "path": ...}``) are downsized and
sent inline as PNG data URLs, so the server never needs to read our storage.

Robustness is the point of this module: a dataset run makes hundreds of thousands of
calls, so transient faults (429, 5xx, timeouts, dropped connections) are retried with
exponential backoff and full jitter, honouring ``Retry-After``; structured output degrades
from ``json_schema`` to ``json_object`` to plain prompting when a server rejects it; and
replies that should be JSON are repaired locally, then re-asked once, before the row is
given up as ``unparseable``. Every failure leaves as :class:`TeacherError` with a reason.

The API key comes from the ``api_key`` option (excluded from dumps and reprs) or from the
environment variable named by ``api_key_env``, read when a request is made. It is sent in
one header and scrubbed from every message this module produces.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import email.utils
import functools
import importlib.util
import io
import ipaddress
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mmat_assets.contracts import Availability, Teacher, TeacherError, TeacherReply, TeacherRequest
from mmat_assets.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)
T = TypeVar("T")

JsonMode = Literal["schema", "json_object", "none"]
JSON_MODES: tuple[JsonMode, ...] = ("schema", "json_object", "none")
#: Request ``params`` forwarded to the server; anything else only shapes the cache key.
FORWARDED_PARAMS = ("temperature", "max_tokens", "max_completion_tokens", "top_p", "seed", "stop",
                    "presence_penalty", "frequency_penalty")
RETRYABLE_STATUS = {408: "timeout", 409: "http_error", 429: "rate_limited"}
LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}
#: Connections per httpx client. httpcore's pool does O(connections²) work each time a
#: request starts or ends; one pool of 64 connections spends more CPU on that than on
#: the requests themselves, so a high concurrency is spread over several small pools.
POOL_CONNECTIONS = 8


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


class OpenAIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_url: str = Field(default="https://api.openai.com/v1",
                          description="Endpoint root; '/chat/completions' is appended.")
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
        default="authorization", description="'authorization' sends 'Bearer <key>'; Azure "
        "OpenAI keys go in an 'api-key' header.",
    )
    api_version: str | None = Field(default=None, description="Sent as the 'api-version' "
                                    "query parameter (Azure OpenAI).")
    vision: bool = Field(default=True, description="Whether the model can look at images.")
    max_image_side: int = Field(default=768, ge=16, description="Images are downsized to "
                                "this longest side before being sent as data URLs.")
    concurrency: int = Field(default=16, ge=1, description="Requests in flight at once "
                             "(per event loop; sync callers share one loop).")
    timeout_s: float = Field(default=120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(default=5, ge=0, description="Retries of one request after "
                             "429, 5xx, timeouts and connection errors.")
    backoff_base_s: float = Field(default=1.0, ge=0, description="First backoff ceiling; "
                                  "it doubles per retry, and the wait is drawn below it.")
    backoff_max_s: float = Field(default=60.0, ge=0, description="Largest wait between "
                                 "retries, Retry-After included.")
    json_mode: JsonMode = Field(
        default="schema", description="How JSON is asked for when a request has a schema: "
        "'schema' (response_format json_schema), 'json_object', or 'none' (prompt only). A "
        "server that rejects it with HTTP 400 moves this teacher one step down, for good.",
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
    """One logical request as it travels through retries, fallbacks and repairs."""

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


class OpenAITeacher(Teacher):
    """GPT-4o, or any OpenAI-compatible chat-completions server, as a teacher."""

    name = "openai"
    version = "1.0.0"
    description = ("Any OpenAI-compatible chat-completions endpoint (OpenAI, Azure, vLLM, "
                   "llama.cpp server, transformers serve); GPT-4o by default.")
    Options = OpenAIOptions
    options: OpenAIOptions

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
        """Loop-bound clients and the sync runner: never copied, rebuilt on demand."""
        self._clients: dict[int, _Pools] = {}
        self._runner: _LoopThread | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Executors may pickle or copy resources; threads, locks and sockets cannot travel.
        state = self.__dict__.copy()
        for key in ("_clients", "_runner", "_lock"):
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
        if importlib.util.find_spec("httpx") is None:
            return Availability(False, "the httpx package is not installed")
        if not self._api_key() and not is_loopback(self.options.base_url):
            return Availability(False, f"no API key: set ${self.options.api_key_env} "
                                f"(or the api_key option) to call {self.options.base_url}")
        return Availability(True)

    def _api_key(self) -> str:
        if self.options.api_key is not None:
            return self.options.api_key.get_secret_value()
        return os.environ.get(self.options.api_key_env, "")

    def _scrub(self, text: str) -> str:
        """Remove the key from any text leaving this module (a server may echo it back)."""
        key = self._api_key()
        return text.replace(key, "***") if len(key) >= 4 else text

    def _error(self, reason: str, detail: str) -> TeacherError:
        return TeacherError(reason, self._scrub(detail))

    # ------------------------------------------------------------- public entry points

    def complete(self, request: TeacherRequest | Mapping[str, Any]) -> TeacherReply:
        """Sync form: runs :meth:`acomplete` on this teacher's own event-loop thread, so
        it works from threads with or without a running loop, and all sync callers share
        one concurrency limit."""
        with self._lock:
            if self._runner is None:
                self._runner = _LoopThread(f"{self.name}-teacher")
        return self._runner.run(self.acomplete(request))

    async def acomplete(self, request: TeacherRequest | Mapping[str, Any]) -> TeacherReply:
        started = time.perf_counter()
        call = await self._prepare(as_request(request))
        content = await self._answer(call)
        return TeacherReply(content=content, prompt_tokens=call.prompt_tokens,
                            completion_tokens=call.completion_tokens, cost_usd=self._cost(call),
                            model=call.model or self.model, attempts=call.attempts,
                            latency_s=time.perf_counter() - started)

    async def aclose(self) -> None:
        """Close the HTTP client bound to the running event loop."""
        pools = self._clients.pop(id(asyncio.get_running_loop()), None)
        if pools is not None:
            await pools.aclose()

    def close(self) -> None:
        """Stop the sync callers' loop thread and its HTTP client."""
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.run(self.aclose())
            runner.stop()

    # ------------------------------------------------------------- request building

    async def _prepare(self, request: TeacherRequest) -> _Call:
        if not self.vision and has_images(request.messages):
            raise self._error("unsupported", f"model {self.model!r} is configured without vision "
                              "but the request holds images")
        messages = await asyncio.to_thread(self._encode_messages, request.messages)
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
        """One chat completion, with retries and the structured-output fallback."""
        data = await self._post_with_retries(call, messages)
        call.model = str(data.get("model") or call.model)
        usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
        call.prompt_tokens += _count(usage.get("prompt_tokens"))
        call.completion_tokens += _count(usage.get("completion_tokens"))
        return self._message_text(data)

    def _message_text(self, data: Mapping[str, Any]) -> str:
        choice = data["choices"][0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        if message.get("refusal") or choice.get("finish_reason") == "content_filter":
            why = message.get("refusal") or "the server's content filter stopped the reply"
            raise self._error("refusal", f"{self.model} refused: {str(why)[:300]}")
        return str(message.get("content") or "")

    async def _post_with_retries(self, call: _Call, messages: list[dict[str, Any]]) -> dict[str, Any]:
        retries = 0
        while True:
            body = self._body(call, messages)
            call.attempts += 1
            outcome = await self._post_once(body)
            if isinstance(outcome, dict):
                self._remember_mode(call.json_mode)
                return outcome
            if outcome.fallback:
                # A 400 may be about response_format or about anything else; stepping down
                # for this call tells which, without trusting each server's error wording.
                sent = body["response_format"]["type"]
                call.json_mode = "none" if sent == "json_object" else "json_object"
                continue
            if not outcome.retry or retries >= self.options.max_retries:
                raise self._error(outcome.reason, f"{outcome.detail} (after {call.attempts} "
                                  f"attempt{'s' if call.attempts > 1 else ''})")
            retries += 1
            delay = self._delay(retries, outcome.retry_after)
            log.warning("%s: %s; retry %d/%d in %.2fs", self.model, self._scrub(outcome.detail),
                        retries, self.options.max_retries, delay)
            await asyncio.sleep(delay)

    def _remember_mode(self, mode: JsonMode) -> None:
        if JSON_MODES.index(mode) > JSON_MODES.index(self._json_mode):
            log.warning("%s rejects response_format modes above %r; using it from now on",
                        self.options.base_url, mode)
            self._json_mode = mode

    def _delay(self, retry: int, retry_after: float | None) -> float:
        """Full jitter below an exponential ceiling, unless the server said how long."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.options.backoff_max_s)
        ceiling = min(self.options.backoff_max_s, self.options.backoff_base_s * 2 ** (retry - 1))
        return random.uniform(0, ceiling)

    async def _post_once(self, body: dict[str, Any]) -> dict[str, Any] | _Failure:
        import httpx

        try:
            async with self._pools().lease() as client:
                resp = await client.post(self._url(), json=body, headers=self._headers())
        except httpx.TimeoutException as exc:
            return _Failure("timeout", f"no reply within {self.options.timeout_s}s "
                            f"({type(exc).__name__})", retry=True)
        except httpx.TransportError as exc:
            return _Failure("http_error", f"connection failed: {type(exc).__name__}: {exc}",
                            retry=True)
        return self._judge_response(resp, "response_format" in body)

    def _judge_response(self, resp: httpx.Response, sent_format: bool) -> dict[str, Any] | _Failure:
        status = resp.status_code
        detail = f"HTTP {status} from {self.options.base_url}: {resp.text[:300]}"
        if status == 200:
            return self._json_body(resp)
        if status == 400 and sent_format:
            return _Failure("http_error", detail, fallback=True)
        retry_after = parse_retry_after_ms(resp.headers.get("retry-after-ms"))
        if retry_after is None:
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
        if status in RETRYABLE_STATUS or status >= 500:
            return _Failure(RETRYABLE_STATUS.get(status, "http_error"), detail, retry=True,
                            retry_after=retry_after)
        return _Failure("http_error", detail)

    def _json_body(self, resp: httpx.Response) -> dict[str, Any] | _Failure:
        # A 200 whose body is not a chat completion is a server fault (a proxy's HTML page,
        # a truncated body): worth another try like a 5xx.
        try:
            data = resp.json()
        except ValueError:
            data = None
        choices = data.get("choices") if isinstance(data, dict) else None
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            return dict(data)
        return _Failure("http_error", f"HTTP 200 but not a chat completion: {resp.text[:300]}",
                        retry=True)

    # ------------------------------------------------------------- HTTP plumbing

    def _url(self) -> str:
        return self.options.base_url.rstrip("/") + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        key = self._api_key()
        if not key:
            return {}
        if self.options.auth_header == "api-key":
            return {"api-key": key}
        return {"Authorization": f"Bearer {key}"}

    def _pools(self) -> _Pools:
        """The HTTP clients and concurrency limit of the running loop (both are loop-bound)."""
        import httpx

        loop = asyncio.get_running_loop()
        # Forget clients of loops that have ended (asyncio.run per call, say); they cannot
        # be closed from here, and their ids may be reused by new loops.
        for key in [k for k, e in self._clients.items() if e.loop.is_closed()]:
            del self._clients[key]
        pools = self._clients.get(id(loop))
        if pools is None or pools.loop is not loop:
            params = {"api-version": self.options.api_version} if self.options.api_version else None
            tls = httpx.create_ssl_context()  # built once: loading the CA bundle takes ~50 ms

            def client(connections: int) -> httpx.AsyncClient:
                # keep-alive for every connection: httpx keeps 20 by default, and closing
                # the rest means a new TCP connection for most requests at high concurrency
                limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
                return httpx.AsyncClient(timeout=self.options.timeout_s, params=params, limits=limits, verify=tls)

            pools = _Pools(loop, client, self.options.concurrency)
            self._clients[id(loop)] = pools
        return pools

    def _cost(self, call: _Call) -> float:
        """USD for every call made for one request (re-asks included); 0 for unknown models."""
        price = self._price(call.model or self.model)
        if price is None:
            return 0.0
        return (call.prompt_tokens * price.input_per_1k
                + call.completion_tokens * price.output_per_1k) / 1000

    def _price(self, model: str) -> ModelPrice | None:
        matches = [k for k in self.options.prices if model == k or model.startswith(k)]
        if not matches and model != self.model:
            return self._price(self.model)
        return self.options.prices[max(matches, key=len)] if matches else None


@dataclass
class _Failure:
    """Why one HTTP attempt did not produce a chat completion, and what to do about it."""

    reason: str
    detail: str
    retry: bool = False
    retry_after: float | None = None
    fallback: bool = False


class _Pools:
    """Small httpx clients behind one concurrency limit; a request takes the least busy.

    The limit never exceeds the connections of all clients together, so the least busy
    client always has a free connection and no request queues inside httpx.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Callable[[int], httpx.AsyncClient],
                 concurrency: int, per_client: int = POOL_CONNECTIONS) -> None:
        count = max(1, math.ceil(concurrency / per_client))
        self.loop = loop
        self.clients = [client(math.ceil(concurrency / count)) for _ in range(count)]
        self.busy = [0] * count
        self.semaphore = asyncio.Semaphore(concurrency)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        async with self.semaphore:
            i = min(range(len(self.busy)), key=self.busy.__getitem__)
            self.busy[i] += 1
            try:
                yield self.clients[i]
            finally:
                self.busy[i] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class _LoopThread:
    """An event loop running in a daemon thread, for sync callers of async code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("complete() called from inside the teacher's own loop; "
                               "await acomplete() there instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


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


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def parse_retry_after_ms(value: str | None) -> float | None:
    """Seconds from OpenAI's and Azure's finer ``retry-after-ms`` header."""
    try:
        return max(float(value), 0.0) / 1000 if value else None
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def image_data_url(path: str, mtime_ns: int, max_side: int) -> str:
    """A PNG data URL of the image at ``path``, longest side at most ``max_side``.

    Cached by modification time: a dialogue sends the same image with every step.
    """
    from mmat_assets.engine.tools import open_rgb

    return _png_data_url(open_rgb(path, max_side))


def bytes_data_url(data: bytes | str, max_side: int) -> str:
    """The same for an image given as bytes (or base64 text)."""
    from mmat_assets.engine.tools import open_rgb

    raw = base64.b64decode(data) if isinstance(data, str) else data
    return _png_data_url(open_rgb(io.BytesIO(raw), max_side))  # type: ignore[arg-type]


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
    trailing commas, single quotes and Python literals (``True``/``None``).
    """
    for candidate in _candidates(text):
        for attempt in (candidate, TRAILING_COMMA.sub(r"\1", candidate)):
            obj = parse_object(attempt, strict=False)
            if obj is not None:
                return obj
        obj = _python_literal(candidate)
        if obj is not None:
            return obj
    return None


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
