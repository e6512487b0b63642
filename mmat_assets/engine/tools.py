"""The tool layer: which tools a teacher may call, and one cached, never-raising call.

``call_tool`` is the only way the engine runs a tool: it looks the result up in the
shard's :class:`~mmat_assets.engine.cache.ResultCache`, runs the tool on a miss, turns any
exception into an error result, and returns a :class:`ToolCall` record for the dialogue.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmat_assets.config import ComponentConfig, ProjectConfig
from mmat_assets.contracts import Availability, Passage, Retriever, Tool, ToolResult
from mmat_assets.engine.cache import ResultCache, cache_key, canonical_json
from mmat_assets.plugins import Registry


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------- configuration


def _entry(cfg: ProjectConfig | None, name: str, kind: str) -> ComponentConfig:
    entries = getattr(cfg, kind, {}) if cfg is not None else {}
    return entries.get(name) or ComponentConfig()


def _instance(registry: Registry, role: str, plugin: str, entry: ComponentConfig,
              cfg: ProjectConfig | None) -> Any:
    obj = registry.create(role, plugin, entry.options)
    if cfg is not None:
        obj.base_dir = cfg.base_dir  # relative option paths resolve against the config
    return obj


def _names(registry: Registry, role: str, entries: Mapping[str, ComponentConfig]) -> list[str]:
    # Every registered implementation under its own name, plus configured aliases.
    return sorted(set(registry.role(role)) | set(entries))


def configured_tools(registry: Registry, cfg: ProjectConfig | None = None,
                     teachers: Mapping[str, Any] | None = None
                     ) -> dict[str, tuple[Tool | None, Availability]]:
    """Every enabled tool with its instance (None if its options are invalid) and availability."""
    out: dict[str, tuple[Tool | None, Availability]] = {}
    entries = cfg.tools if cfg is not None else {}
    for name in _names(registry, "tool", entries):
        entry = _entry(cfg, name, "tools")
        if not entry.enabled:
            continue
        out[name] = _build(registry, "tool", entry.plugin or name, entry, cfg, teachers)
    return out


def configured_retrievers(registry: Registry, cfg: ProjectConfig | None = None,
                          index_root: str | Path | None = None
                          ) -> dict[str, tuple[Retriever | None, Availability]]:
    """Every enabled retriever with its instance and availability (same rules as tools).

    Retrievers with an ``attach_index(dir)`` method are pointed at ``index_root/<name>``,
    where the ``retrievers/<name>`` asset built their index.
    """
    out: dict[str, tuple[Retriever | None, Availability]] = {}
    entries = cfg.retrievers if cfg is not None else {}
    for name in _names(registry, "retriever", entries):
        entry = _entry(cfg, name, "retrievers")
        if not entry.enabled:
            continue
        obj, avail = _build(registry, "retriever", entry.plugin or name, entry, cfg, None)
        attach = getattr(obj, "attach_index", None)
        if index_root is not None and callable(attach):
            attach(Path(index_root) / name)
        out[name] = (obj, avail)
    return out


def _build(registry: Registry, role: str, plugin: str, entry: ComponentConfig,
           cfg: ProjectConfig | None, teachers: Mapping[str, Any] | None
           ) -> tuple[Any, Availability]:
    try:
        obj = _instance(registry, role, plugin, entry, cfg)
    except Exception as exc:  # bad options or unknown plugin: report, do not abort the rest
        return None, Availability(False, f"cannot create {role} {plugin!r}: {exc}")
    attach = getattr(obj, "attach_teachers", None)
    if callable(attach):
        attach(dict(teachers or {}))
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


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _options(component: Any) -> dict[str, Any]:
    opts = getattr(component, "options", None)
    return opts.model_dump(mode="json") if opts is not None else {}


def _run_safely(tool: Tool, image: Path, args: Mapping[str, Any]) -> ToolResult:
    start = time.perf_counter()
    try:
        result = tool.run(image, args)
        if not isinstance(result, ToolResult):
            raise TypeError(f"tool returned {type(result).__name__}, not ToolResult")
    except Exception as exc:  # a tool bug on one image must not end the shard
        result = ToolResult("", error=f"{type(exc).__name__}: {exc}")
    if not result.latency_s:
        result.latency_s = time.perf_counter() - start
    return result


def call_tool(tool: Tool, image_path: str | Path, image_sha256: str | None,
              args: Mapping[str, Any] | None, cache: ResultCache | None) -> ToolCall:
    """Run ``tool`` on one image through the cache; never raises for a tool failure."""
    args = dict(args or {})
    sha = image_sha256 or _safe_sha(image_path)
    key = cache_key(tool.name, tool.version, args, sha, _options(tool))
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        result = ToolResult(hit["text"], hit.get("data") or {}, float(hit.get("latency_s", 0.0)))
    else:
        result = _run_safely(tool, Path(image_path), args)
        if cache is not None and result.error is None:
            cache.put(key, {"text": result.text, "data": result.data,
                            "latency_s": result.latency_s})
    return ToolCall(tool=tool.name, version=tool.version, args=canonical_json(args),
                    cache_key=key, text=result.text, data=result.data, error=result.error,
                    latency_s=result.latency_s, cached=hit is not None)


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


# ----------------------------------------------------------------- image helpers


def open_rgb(path: str | Path, max_side: int | None = None) -> Any:
    """Decode any image a tool may meet into 8-bit RGB (PIL).

    16-bit and float greyscale are rescaled (a plain convert would clip them to white),
    transparency is flattened onto white (text drawn on a transparent background stays
    readable), and ``max_side`` bounds the size a detector sees.
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # raises here, inside the tool, on truncated files
        img = _to_rgb(img)
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    return img


def _to_rgb(img: Any) -> Any:
    import numpy as np
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


__all__ = [
    "ToolCall",
    "available_tools",
    "call_tool",
    "configured_retrievers",
    "configured_tools",
    "file_sha256",
    "open_rgb",
    "search_cached",
    "tool_prompt",
]
