"""Tools group: one asset per tool, ``tools/<name>``, recording whether it runs here.

Materializing a tool asset creates the tool with its configured options, checks its
availability, and probes it on small images made at run time (rendered text; the
scikit-image astronaut photo when scikit-image is installed). Version, options,
availability, reason and the probes land in the materialization's metadata, so the UI
shows which operators a teacher will be offered on this deployment.
No `from __future__ import annotations` here: Dagster reads the context annotations.
"""

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from mmat_assets.config import ComponentConfig, ProjectConfig
from mmat_assets.contracts import Tool
from mmat_assets.engine.tools import call_tool, configured_tools
from mmat_assets.plugins import Registry
from mmat_assets.versions import doc_version

PROBE_TEXT = "Total | 42\nApples | 17"


def probe_images(out_dir: Path) -> dict[str, Path]:
    """Small images for probes: rendered text always, the astronaut photo if available."""
    from PIL import Image, ImageDraw, ImageFont

    out_dir.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (420, 150), "white")
    ImageDraw.Draw(img).multiline_text((20, 20), PROBE_TEXT.replace(" | ", "    "), fill="black",
                                       font=ImageFont.load_default(size=40), spacing=20)
    paths = {"text": out_dir / "text.png"}
    img.save(paths["text"])
    try:
        from skimage import data
    except ImportError:
        return paths
    paths["astronaut"] = out_dir / "astronaut.png"
    Image.fromarray(data.astronaut()).save(paths["astronaut"])
    return paths


def probe_tool(tool: Tool, images: Mapping[str, Path]) -> list[dict[str, Any]]:
    """Run ``tool`` once per probe image (no cache), with the arguments it declares for
    probes (``Tool.probe_args``); what it said, how fast, any error."""
    rows = []
    for label, path in images.items():
        call = call_tool(tool, path, None, dict(tool.probe_args), cache=None)
        rows.append({"image": label, "latency_s": round(call.latency_s, 4),
                     "text": call.text[:300], "error": call.error})
    return rows


def _entries(cfg: ProjectConfig, registry: Registry) -> dict[str, ComponentConfig]:
    names = set(registry.role("tool")) | set(cfg.tools)
    entries = {n: cfg.tools.get(n) or ComponentConfig() for n in sorted(names)}
    return {n: e for n, e in entries.items() if e.enabled}


def tool_report(cfg: ProjectConfig, registry: Registry, name: str,
                teachers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the asset records about one tool (pure: no Dagster)."""
    tool, avail = configured_tools(registry, cfg, teachers)[name]
    entry = cfg.tools.get(name) or ComponentConfig()
    report: dict[str, Any] = {
        "tool": name, "plugin": entry.plugin or name,
        "version": getattr(tool, "version", None), "options": _options(tool, entry),
        "available": avail.ok, "reason": avail.reason, "probes": [],
    }
    if tool is not None and avail.ok:
        with tempfile.TemporaryDirectory() as tmp:
            report["probes"] = probe_tool(tool, probe_images(Path(tmp)))
    return report


def _options(tool: Any, entry: ComponentConfig) -> dict[str, Any]:
    opts = getattr(tool, "options", None)
    return opts.model_dump(mode="json") if opts is not None else dict(entry.options)


def report_version(report: Mapping[str, Any]) -> str:
    """The data version of a tool asset: what the tool is (version, options), whether it runs
    here, and which probes failed. Not the probe texts: a caption from a remote teacher need
    not repeat word for word, and a rebuild must not turn every rationale stale for that."""
    probes = [{"image": p["image"], "failed": bool(p["error"])} for p in report["probes"]]
    return doc_version({**report, "probes": probes})


def _metadata(report: Mapping[str, Any]) -> dict[str, Any]:
    latencies = [p["latency_s"] for p in report["probes"] if not p["error"]]
    return {
        "version": str(report["version"]),
        "plugin": report["plugin"],
        "available": report["available"],
        "reason": report["reason"] or "-",
        "options": dg.MetadataValue.json(report["options"]),
        "probes": dg.MetadataValue.json(report["probes"]),
        "probe_errors": sum(1 for p in report["probes"] if p["error"]),
        "probe_latency_s_max": max(latencies) if latencies else 0.0,
    }


def _tool_asset(cfg: ProjectConfig, registry: Registry, name: str, entry: ComponentConfig,
                teachers: Mapping[str, Any] | None) -> dg.AssetsDefinition:
    @dg.asset(
        name=name, key_prefix=["tools"], group_name="tools",
        code_version=registry.version("tool", entry.plugin or name),
        description=f"Tool {name!r}: availability on this deployment and a probe run.",
        kinds={"python"},
    )
    def _asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        report = tool_report(cfg, registry, name, teachers)
        if not report["available"]:
            context.log.warning(f"tool {name} is unavailable: {report['reason']}")
        return dg.MaterializeResult(metadata=_metadata(report), data_version=dg.DataVersion(report_version(report)))

    return _asset


def build_tool_assets(cfg: ProjectConfig, registry: Registry,
                      teachers: Mapping[str, Any] | None = None) -> list[dg.AssetsDefinition]:
    """One ``tools/<name>`` asset per registered (or configured) enabled tool."""
    return [_tool_asset(cfg, registry, name, entry, teachers)
            for name, entry in _entries(cfg, registry).items()]


__all__ = ["build_tool_assets", "probe_images", "probe_tool", "tool_report"]
