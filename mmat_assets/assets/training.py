"""Training and evaluation groups: the student, the tuned model, its scores, the report.

``student_base`` resolves the configured student (builds the offline LLaVA + SmolLM2 one
once); ``tuned_model`` trains it out of process through Dagster Pipes on the configured
export and records the export's data version, the training config and the code version;
``evaluations/<model>/<benchmark>/<mode>`` score base and tuned students with the tools in
the loop; ``evaluation_report`` is the paper-style table.
No `from __future__ import annotations` here: Dagster reads the context annotations.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg

from mmat_assets import __version__
from mmat_assets.assets._shared import tool_keys
from mmat_assets.assets.export import SAMPLE_IDS, configured_trainer
from mmat_assets.config import ProjectConfig
from mmat_assets.contracts import Component, Trainer
from mmat_assets.engine import evaluate as ev
from mmat_assets.engine.tools import available_tools
from mmat_assets.plugins import Registry, class_ref
from mmat_assets.resources import StorageResource
from mmat_assets.versions import TIMING_KEYS, doc_version, tree_version

TRAIN_GROUP, EVAL_GROUP = "training", "evaluation"
MODELS = ("base", "tuned")


def _local(storage: StorageResource, *parts: str) -> Path:
    p = storage.path(*parts)
    return Path(p.path) if p.protocol in ("", "file", "local") else Path(".mmat-local", *parts).resolve()


def student_asset(cfg: ProjectConfig, registry: Registry) -> dg.AssetsDefinition:
    @dg.asset(group_name=TRAIN_GROUP, io_manager_key="json_io_manager", code_version="1", kinds={"pytorch"})
    def student_base(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.Output[dict[str, Any]]:
        """The student before tuning: one the trainer builds locally once (``hf_lora``'s
        offline LLaVA-style model: SmolLM2-135M-Instruct + a small vision tower), or a hub
        id / local path used as it is."""
        trainer = configured_trainer(cfg, registry)
        path = trainer.base_student(cfg.export.student, _local(storage, "models", "student-base"))
        if path is None:
            out = {"path": cfg.export.student, "built": False}
            local = Path(cfg.export.student)
            version = tree_version(local) if local.is_dir() else doc_version(out)
            return dg.Output(out, data_version=dg.DataVersion(version))
        return dg.Output({"path": str(path), "built": True}, data_version=dg.DataVersion(tree_version(path)),
                         metadata={"path": dg.MetadataValue.path(str(path))})

    return student_base


def tuned_asset(cfg: ProjectConfig, registry: Registry) -> dg.AssetsDefinition:
    t = cfg.training
    export_key = ["exports", t.exporter]

    @dg.asset(group_name=TRAIN_GROUP, io_manager_key="json_io_manager", kinds={"pytorch"},
              code_version=f"{__version__}+{t.trainer}-{registry.version('trainer', t.trainer)}",
              ins={"export": dg.AssetIn(export_key), "student": dg.AssetIn("student_base")})
    def tuned_model(context: dg.AssetExecutionContext, storage: StorageResource, export: dict[str, Any],
                    student: dict[str, Any]) -> dg.Output[dict[str, Any]]:
        """The student fine-tuned (LoRA SFT, SPEC §3 defaults) on the configured export, run
        out of process through Dagster Pipes; downstream of the data in the lineage graph."""
        from mmat_assets.engine.training import run_training_pipes

        files = export["files"]
        train_dir = _local(storage, "models", "train-data")
        train_dir.mkdir(parents=True, exist_ok=True)
        _link_train_file(Path(files[t.data]), train_dir / "train.jsonl")
        cls = registry.get("trainer", t.trainer).cls
        options = training_options(cls, t.options, student["path"])
        out_dir = _local(storage, "models", "tuned")
        reported = run_training_pipes(context, t.trainer, options, str(train_dir), str(out_dir),
                                      base_dir=cfg.base_dir, trainer_class=class_ref(cls)).get_materialize_result()
        metrics = {k: getattr(v, "value", v) for k, v in (reported.metadata or {}).items()}
        meta = {"checkpoint": str(out_dir), **metrics, "model_dir": str(out_dir), "export": "/".join(export_key),
                "export_data_version": export["data_version"], "data": t.data, "trainer": t.trainer,
                "training_config": options, "code_version": __version__, "student": student["path"],
                # the evaluation's per-turn token limits, from the lengths of the turns it was trained on
                "generation_limits": ev.limits_of_export(
                    files, configured_trainer(cfg, registry).token_counter(student["path"]))}
        if export.get("sample_ids") and Path(export["sample_ids"]).is_file():  # the samples it was trained on
            ids = out_dir / SAMPLE_IDS
            ids.write_bytes(Path(export["sample_ids"]).read_bytes())
            meta["sample_ids"] = str(ids)
        (out_dir / "mmat_lineage.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        weights = Path(meta["checkpoint"])  # the trained weights alone: the rest records timings
        return dg.Output(meta, data_version=dg.DataVersion(tree_version(weights if weights.is_dir() else out_dir)),
                         metadata={**(reported.metadata or {}), "export_data_version": export["data_version"],
                                   "checkpoint": dg.MetadataValue.path(str(meta["checkpoint"])),
                                   "training_config": dg.MetadataValue.json(options)})

    return tuned_model


def training_options(cls: type[Component[Any]], options: dict[str, Any], student: str) -> dict[str, Any]:
    """The configured options, with the base student in ``student`` for a trainer whose
    options declare that field (see :class:`~mmat_assets.contracts.Trainer`)."""
    if "student" in cls.Options.model_fields:
        return {"student": student, **options}
    return dict(options)


def _link_train_file(src: Path, dst: Path) -> None:
    """The trainer reads ``train.jsonl`` beside the images its relative paths name: the
    export's ``images`` folder is linked in, not copied."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    dst.write_bytes(src.read_bytes())
    images = dst.parent / "images"
    if images.is_symlink() or images.is_file():
        images.unlink()
    elif images.is_dir():
        shutil.rmtree(images)
    images.symlink_to((src.parent / "images").resolve(), target_is_directory=True)


def _limits(cfg: ProjectConfig, registry: Registry, storage: StorageResource, student: dict[str, Any],
            tuned: dict[str, Any] | None) -> ev.Limits:
    """The tuned model's recorded generation limits; for the base student, the same limits
    sized from the export (so both answer under one budget)."""
    recorded = (tuned or {}).get("generation_limits")
    if recorded is None:
        manifest = _export_manifest(storage, cfg) or {}
        recorded = ev.limits_of_export(manifest.get("files") or {},
                                       configured_trainer(cfg, registry).token_counter(student["path"]))
    return ev.Limits.of(recorded, cfg.evaluation.max_new_tokens, cfg.evaluation.token_cap)


def _responder(trainer: Trainer, student: dict[str, Any], tuned: dict[str, Any] | None,
               max_new_tokens: int) -> ev.Responder:
    """The base student (or the tuned one), run by the trainer that trains it."""
    checkpoint = Path(tuned["checkpoint"]) if tuned is not None else None
    return trainer.responder(student["path"], checkpoint, max_new_tokens)


def resume_file(storage: StorageResource, cfg: ProjectConfig, key: list[str], mode: str, student: dict[str, Any],
                tuned: dict[str, Any] | None, harness: ev.Harness, items: list[Any]) -> Path:
    """Where an evaluation keeps its finished batches, named by what decides them: the asset,
    the student and the tuned weights (their bytes), the mode, the harness (each tool's class,
    version and options; limits, step cap, batch size) and the items in order. A stopped evaluation
    resumes from it; anything different starts a new file."""
    weights = Path(str((tuned or {}).get("checkpoint", "")))
    parts = {"asset": key, "mode": mode, "student": student.get("path"),
             "tuned": (tuned or {}).get("checkpoint"),
             "weights": tree_version(weights) if tuned and weights.is_dir() else None,
             "tools": {n: [f"{type(t).__module__}.{type(t).__qualname__}", str(getattr(t, "version", "")),
                           cfg.tools[n].model_dump(mode="json") if n in cfg.tools else None]
                       for n, t in sorted(harness.tools.items())},
             "limits": harness.limits.__dict__, "orr_tools": list(harness.orr_tools), "max_steps": harness.max_steps,
             "batch_size": harness.batch_size, "items": [i.item_id for i in items]}
    return _local(storage, "eval", "partial", ev.resume_name(parts))


def _training_ids(export: dict[str, Any] | None) -> set[str]:
    if not export:
        return set()
    ids = set()
    path = Path(export["files"].get("rr", ""))
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            ids.add(str(json.loads(line).get("source_row_id", "")))
    return ids


def eval_asset(cfg: ProjectConfig, registry: Registry, model: str, bench: str, mode: str) -> dg.AssetsDefinition:
    entry = cfg.evaluation.benchmarks[bench]
    ins = {"student": dg.AssetIn("student_base")}
    if model == "tuned":
        ins["tuned"] = dg.AssetIn("tuned_model")
    plugin = entry.plugin or bench
    deps = tool_keys(cfg, registry) if mode != "baseline" else []  # the tools run in the loop
    if cfg.evaluation.exclude_training_rows:  # items the export trained on are left out
        deps.append(dg.AssetKey(["exports", cfg.training.exporter]))

    @dg.asset(key=["evaluations", model, bench, mode], group_name=EVAL_GROUP, io_manager_key="json_io_manager",
              ins=ins, deps=deps, code_version=f"1+{plugin}-{registry.version('benchmark', plugin)}", kinds={"pytorch"},
              description=f"The {model} student on {bench!r} in {mode} mode (tools in the loop for orr/rr).")
    def _asset(context: dg.AssetExecutionContext, storage: StorageResource, **inputs: Any) -> dg.Output[dict[str, Any]]:
        e = cfg.evaluation
        benchmark = registry.create("benchmark", plugin, entry.options, base_dir=cfg.base_dir)
        items = list(benchmark.items())
        if e.exclude_training_rows:
            seen = _training_ids(_export_manifest(storage, cfg))
            items = [i for i in items if i.item_id not in seen]
        items = items[: e.limit] if e.limit else items
        harness = ev.Harness(available_tools(registry, cfg), None, tuple(e.orr_tools), e.max_steps,
                             limits=_limits(cfg, registry, storage, inputs["student"], inputs.get("tuned")),
                             batch_size=e.batch_size)
        respond = _responder(configured_trainer(cfg, registry), inputs["student"], inputs.get("tuned"),
                             e.max_new_tokens)
        resume = resume_file(storage, cfg, ["evaluations", model, bench, mode], mode, inputs["student"],
                             inputs.get("tuned"), harness, items)

        def progress(n: int) -> None:
            if n % 5 == 0 or n == len(items):
                context.log.info(f"{model}/{bench}/{mode}: {n}/{len(items)}")

        results = ev.evaluate(respond, benchmark, items, mode, harness, _local(storage, "eval", "images"), progress,
                              resume=resume)
        resume.unlink(missing_ok=True)  # every batch is in the output now
        summary = {"model": model, "benchmark": bench, "mode": mode, **ev.summary(results),
                   "limits": harness.limits.__dict__}
        out = {**summary, "results": [r.__dict__ for r in results]}
        return dg.Output(out, data_version=dg.DataVersion(doc_version(out, TIMING_KEYS)), metadata={
            "score": summary["score"], "items": summary["items"], "latency_s": summary["latency_s"],
            "mean_steps": summary["mean_steps"]})

    return _asset


def _export_manifest(storage: StorageResource, cfg: ProjectConfig) -> dict[str, Any] | None:
    from mmat_assets.assets.export import export_dir, read_manifest

    return read_manifest(export_dir(storage, cfg.training.exporter))


def report_asset(cfg: ProjectConfig, keys: list[list[str]]) -> dg.AssetsDefinition:
    ins = {"_".join(k[1:]): dg.AssetIn(k) for k in keys}
    ins["tuned"] = dg.AssetIn("tuned_model")

    @dg.asset(group_name=EVAL_GROUP, io_manager_key="json_io_manager", ins=ins, code_version="1", kinds={"markdown"})
    def evaluation_report(context: dg.AssetExecutionContext, storage: StorageResource,
                          **inputs: Any) -> dg.Output[dict[str, Any]]:
        """Base vs tuned in every mode: the paper's table (benchmarks, average, latency)."""
        tuned = inputs.pop("tuned")
        rows = [{k: v for k, v in r.items() if k != "results"} for r in inputs.values()]
        table = ev.report_markdown(rows)
        header = (f"Tuned model `{tuned['checkpoint']}` trained on export data version "
                  f"`{tuned['export_data_version']}` ({tuned.get('steps', '?')} steps).\n\n")
        path = _local(storage, "reports", "evaluation.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + table + "\n", encoding="utf-8")
        out = {"rows": rows, "path": str(path), "export_data_version": tuned["export_data_version"]}
        return dg.Output(out, data_version=dg.DataVersion(doc_version(out, TIMING_KEYS)), metadata={
            "report": dg.MetadataValue.md(header + table), "path": dg.MetadataValue.path(str(path)),
            "mmat/summary": f"{header}{table}\n({path})"})

    return evaluation_report


def build(cfg: ProjectConfig, registry: Registry) -> list[dg.AssetsDefinition]:
    if not cfg.sources:
        return []
    assets = [student_asset(cfg, registry), tuned_asset(cfg, registry)]
    keys = []
    for bench in cfg.evaluation.benchmarks:
        for model in MODELS:
            for mode in cfg.evaluation.modes:
                assets.append(eval_asset(cfg, registry, model, bench, mode))
                keys.append(["evaluations", model, bench, mode])
    if keys:
        assets.append(report_asset(cfg, keys))
    return assets
