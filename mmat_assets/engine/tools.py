"""The tool layer: which tools a teacher may call, and one cached, never-raising call.

``call_tool`` is the only way the engine runs a tool: it looks the result up in the
shard's :class:`~mmat_assets.engine.cache.ResultCache`, runs the tool on a miss, turns any
exception into an error result, and returns a :class:`ToolCall` record for the dialogue.

Every call is bounded by the tool's :class:`ToolLimits` (``tools: {name: {timeout_s,
max_result_chars}}`` in the config; 120 s and 16,384 characters by default):

- The tool runs in a daemon worker thread, and the caller waits at most ``timeout_s``. A
  call still running then is an error result for that call ("timed out after 120 s"). A
  thread cannot be killed, so the worker is left behind, never joined: it holds neither
  the shard nor the process at exit. While ``MAX_STUCK_CALLS`` calls of one tool are still
  running past their timeout, further calls of that tool fail at once instead of piling
  up more threads.
- Result text longer than ``max_result_chars`` characters (characters, not bytes: the
  teacher and the dialogues see text) keeps its first ``max_result_chars`` and ends with
  ``… [truncated N characters]``; the :class:`ToolCall` counts the cut in
  ``truncated_chars``. ``data`` whose JSON is longer than the cap is replaced by
  ``{"truncated_chars": N}``. The cap changes what a call returns, so it is part of the
  cache key; the timeout is not (a timed-out call is an error, and errors are never cached).
- A malformed result (not a ``ToolResult``, ``text`` not a string, ``data`` not a dict the
  cache can store, ``error`` neither None nor a string) is an error result for that call only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmat_assets.config import ComponentConfig, ProjectConfig, ToolConfig
from mmat_assets.contracts import Availability, Passage, Retriever, Tool, ToolResult
from mmat_assets.engine.cache import ResultCache, cache_key, canonical_json, claim_or_wait
from mmat_assets.plugins import Registry
from mmat_assets.toolkit.images import file_sha256, open_rgb


@dataclass
class ToolCall:
    """One tool call as the dialogue and the rationale table record it."""

    tool: str
    version: str
    args: str
    cache_key: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    latency_s: float = 0.0
    cached: bool = False
    #: characters cut from the tool's text by ``max_result_chars`` (0: kept whole)
    truncated_chars: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DEFAULTS = ToolConfig()
#: Calls of one tool left running past their timeout before further calls fail at once.
MAX_STUCK_CALLS = 4


@dataclass(frozen=True)
class ToolLimits:
    """How long one call of a tool may run and how much of its result is kept."""

    timeout_s: float = _DEFAULTS.timeout_s
    max_result_chars: int = _DEFAULTS.max_result_chars

    @classmethod
    def of(cls, entry: ComponentConfig) -> ToolLimits:
        return cls(getattr(entry, "timeout_s", cls.timeout_s),
                   getattr(entry, "max_result_chars", cls.max_result_chars))


def limits_of(tool: Tool) -> ToolLimits:
    """The limits :func:`configured_tools` gave ``tool``; the defaults for any other tool."""
    limits = getattr(tool, "call_limits", None)
    return limits if isinstance(limits, ToolLimits) else ToolLimits()


# --------------------------------------------------------------------- configuration


def _entry(cfg: ProjectConfig | None, name: str, kind: str) -> ComponentConfig:
    entries = getattr(cfg, kind, {}) if cfg is not None else {}
    return entries.get(name) or ComponentConfig()


def _instance(registry: Registry, role: str, plugin: str, entry: ComponentConfig,
              cfg: ProjectConfig | None) -> Any:
    # relative option paths resolve against the config file's directory
    return registry.create(role, plugin, entry.options, base_dir=cfg.base_dir if cfg is not None else None)


def _names(registry: Registry, role: str, entries: Mapping[str, ComponentConfig]) -> list[str]:
    # Every registered implementation under its own name, plus configured aliases.
    return sorted(set(registry.role(role)) | set(entries))


def _enabled(registry: Registry, role: str, kind: str, cfg: ProjectConfig | None,
             teachers: Mapping[str, Any] | None) -> Iterator[tuple[str, ComponentConfig, Any, Availability]]:
    """Each enabled implementation of ``role`` (config section ``kind``), built, in name order."""
    entries: Mapping[str, ComponentConfig] = getattr(cfg, kind) if cfg is not None else {}
    for name in _names(registry, role, entries):
        entry = _entry(cfg, name, kind)
        if not entry.enabled:
            continue
        obj, avail = _build(registry, role, entry.plugin or name, entry, cfg, teachers)
        yield name, entry, obj, avail


def configured_tools(registry: Registry, cfg: ProjectConfig | None = None,
                     teachers: Mapping[str, Any] | None = None
                     ) -> dict[str, tuple[Tool | None, Availability]]:
    """Every enabled tool with its instance (None if its options are invalid) and availability."""
    out: dict[str, tuple[Tool | None, Availability]] = {}
    for name, entry, tool, avail in _enabled(registry, "tool", "tools", cfg, teachers):
        if tool is not None:
            tool.call_limits = ToolLimits.of(entry)  # read by call_tool on every call
        out[name] = (tool, avail)
    return out


def configured_retrievers(registry: Registry, cfg: ProjectConfig | None = None,
                          index_root: str | Path | None = None
                          ) -> dict[str, tuple[Retriever | None, Availability]]:
    """Every enabled retriever with its instance and availability (same rules as tools).

    With ``index_root``, each is pointed (``attach_index``) at ``index_root/<name>``, where
    the ``retrievers/<name>`` asset built its index.
    """
    out: dict[str, tuple[Retriever | None, Availability]] = {}
    for name, _, obj, avail in _enabled(registry, "retriever", "retrievers", cfg, None):
        if index_root is not None and isinstance(obj, Retriever):
            obj.attach_index(Path(index_root) / name)
        out[name] = (obj, avail)
    return out


def _build(registry: Registry, role: str, plugin: str, entry: ComponentConfig,
           cfg: ProjectConfig | None, teachers: Mapping[str, Any] | None
           ) -> tuple[Any, Availability]:
    try:
        obj = _instance(registry, role, plugin, entry, cfg)
    except Exception as exc:  # bad options or unknown plugin: report, do not abort the rest
        return None, Availability(False, f"cannot create {role} {plugin!r}: {exc}")
    if isinstance(obj, Tool):
        obj.attach_teachers(dict(teachers or {}))
    try:
        return obj, obj.availability()
    except Exception as exc:
        return obj, Availability(False, f"availability check failed: {type(exc).__name__}: {exc}")


def available_tools(registry: Registry, cfg: ProjectConfig | None = None,
                    teachers: Mapping[str, Any] | None = None) -> dict[str, Tool]:
    """The tools a teacher may be offered: enabled, created and available here."""
    return {name: tool for name, (tool, avail) in configured_tools(registry, cfg, teachers).items()
            if tool is not None and avail.ok}


def tool_prompt(tools: Mapping[str, Tool]) -> str:
    """One line per tool, ``- name: description``, for the teacher's system prompt."""
    lines = []
    for name in sorted(tools):
        desc = " ".join((tools[name].description or "").split())
        lines.append(f"- {name}: {desc}" if desc else f"- {name}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- calls


def _options(component: Any) -> dict[str, Any]:
    opts = getattr(component, "options", None)
    return opts.model_dump(mode="json") if opts is not None else {}


def _run_safely(tool: Tool, image: Path, args: Mapping[str, Any]) -> ToolResult:
    start = time.perf_counter()
    try:
        result = _checked(tool.run(image, args))
    except Exception as exc:  # a tool bug on one image must not end the shard
        result = ToolResult("", error=f"{type(exc).__name__}: {exc}")
    if not result.latency_s:
        result.latency_s = time.perf_counter() - start
    return result


def _checked(result: Any) -> ToolResult:
    """``result`` if it is a well-formed ToolResult; a TypeError naming the fault if not."""
    if not isinstance(result, ToolResult):
        raise TypeError(f"tool returned {type(result).__name__}, not ToolResult")
    if not isinstance(result.text, str):
        raise TypeError(f"tool returned text of type {type(result.text).__name__}, not str")
    if not isinstance(result.data, dict):
        raise TypeError(f"tool returned data of type {type(result.data).__name__}, not dict")
    if result.error is not None and not isinstance(result.error, str):
        raise TypeError(f"tool returned an error of type {type(result.error).__name__}, not str")
    canonical_json(result.data)  # raises for data the cache cannot hold (mixed key types...)
    latency = result.latency_s
    if not isinstance(latency, int | float) or isinstance(latency, bool) or not latency >= 0:
        result.latency_s = 0.0  # measured by the caller instead
    return result


class _Stuck:
    """Calls per tool instance still running past their timeout (their threads live on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}

    def count(self, tool: Tool) -> int:
        with self._lock:
            return self._counts.get(id(tool), 0)

    def add(self, tool: Tool, delta: int) -> None:
        # The worker holds a reference to the tool while counted, so its id is not reused.
        with self._lock:
            n = self._counts.get(id(tool), 0) + delta
            if n > 0:
                self._counts[id(tool)] = n
            else:
                self._counts.pop(id(tool), None)


_STUCK = _Stuck()


def _run_bounded(tool: Tool, image: Path, args: Mapping[str, Any], timeout_s: float) -> ToolResult:
    """Run the tool in a daemon thread; an error result if it has not answered in time."""
    stuck = _STUCK.count(tool)
    if stuck >= MAX_STUCK_CALLS:
        return ToolResult("", error=f"not run: {stuck} earlier calls of this tool are still running "
                          f"past their {timeout_s:g} s timeout")
    done = threading.Event()
    lock = threading.Lock()
    box: list[ToolResult] = []
    abandoned = False

    def work() -> None:
        try:
            result = _run_safely(tool, image, args)
        except BaseException as exc:  # SystemExit in a thread would end the call silently
            result = ToolResult("", error=f"{type(exc).__name__}: {exc}")
        with lock:
            box.append(result)
            done.set()
            if abandoned:
                _STUCK.add(tool, -1)

    worker = threading.Thread(target=work, name=f"tool-{tool.name}", daemon=True)
    worker.start()
    if not done.wait(timeout_s):
        with lock:
            if not done.is_set():
                abandoned = True
                _STUCK.add(tool, 1)
                return ToolResult("", error=f"timed out after {timeout_s:g} s", latency_s=timeout_s)
    return box[0]


def _cut(text: str, cap: int) -> str:
    over = len(text) - cap
    return f"{text[:cap]}… [truncated {over:,} characters]" if over > 0 else text


def _capped(result: ToolResult, cap: int) -> tuple[ToolResult, int]:
    """The result with its text, data and error held to ``cap`` characters; and the text cut."""
    size = len(canonical_json(result.data)) if result.data else 0
    data = {"truncated_chars": size} if size > cap else result.data
    error = _cut(result.error, cap) if result.error is not None else None
    capped = ToolResult(_cut(result.text, cap), data, result.latency_s, error)
    return capped, max(0, len(result.text) - cap)


def call_tool(tool: Tool, image_path: str | Path, image_sha256: str | None,
              args: Mapping[str, Any] | None, cache: ResultCache | None,
              limits: ToolLimits | None = None) -> ToolCall:
    """Run ``tool`` on one image through the cache, within ``limits`` (default: the tool's
    configured ones); never raises for a tool failure."""
    args = dict(args or {})
    limits = limits or limits_of(tool)
    sha = image_sha256 or _safe_sha(image_path)
    key = cache_key(tool.name, tool.version, args, sha,
                    {"options": _options(tool), "max_result_chars": limits.max_result_chars})

    def run() -> tuple[tuple[ToolResult, int], dict[str, Any] | None]:
        result, cut = _capped(_run_bounded(tool, Path(image_path), args, limits.timeout_s),
                              limits.max_result_chars)
        value = {"text": result.text, "data": result.data, "latency_s": result.latency_s,
                 "truncated_chars": cut}
        return (result, cut), (value if result.error is None else None)

    # Claimed before it runs: another process calling the same tool on the same image waits.
    hit, ran = claim_or_wait(cache, key, run)
    if hit is not None:
        result = ToolResult(hit["text"], hit.get("data") or {}, float(hit.get("latency_s", 0.0)))
        cut = int(hit.get("truncated_chars", 0))
    else:
        assert ran is not None
        result, cut = ran
    return ToolCall(tool=tool.name, version=tool.version, args=canonical_json(args),
                    cache_key=key, text=result.text, data=result.data, error=result.error,
                    latency_s=result.latency_s, cached=hit is not None, truncated_chars=cut)


def _safe_sha(path: str | Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""  # the tool reports the unreadable file; the key still names the path's args


def search_cached(retriever: Retriever, query: str, k: int,
                  cache: ResultCache | None) -> tuple[list[Passage], bool]:
    """Retrieve through the cache (namespace ``retrieval``); returns (passages, cached)."""
    key = cache_key(retriever.name, retriever.version, {"query": query, "k": k}, "",
                    _options(retriever))
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return [Passage(**p) for p in hit["passages"]], True
    passages = retriever.search(query, k)
    if cache is not None:
        cache.put(key, {"passages": [asdict(p) for p in passages]})
    return passages, False


__all__ = [
    "MAX_STUCK_CALLS",
    "ToolCall",
    "ToolLimits",
    "available_tools",
    "call_tool",
    "configured_retrievers",
    "configured_tools",
    "file_sha256",
    "limits_of",
    "open_rgb",
    "search_cached",
    "tool_prompt",
]
