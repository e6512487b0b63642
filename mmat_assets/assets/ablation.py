"""Ablation group: the paper's Table 5 as assets (``ablation:`` in the config).

``ablation/split`` draws the held-out problems (a seeded split of the benchmark's item ids,
recorded); ``ablation/data/<variant>`` derives each variant's training file from the same
RR/ORR samples, held-out problems left out (no new teacher call); ``ablation/models/<variant>/
s<seed>`` trains the student on it with the same budget for every variant, out of process
through Dagster Pipes, recording the per-turn generation limits of its data;
``ablation/evals/<variant>/...`` scores each model (and the untuned student) on the held-out
problems; ``ablation_report`` is the table with bootstrap intervals (markdown asset and file).
Each cell is its own asset, so a rerun materializes only what is missing.
No `from __future__ import annotations` here: Dagster reads the context annotations.
"""

import json
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from mmat_assets import __version__
from mmat_assets.assets._shared import tool_keys
from mmat_assets.assets.export import configured_trainer, encoder_for
from mmat_assets.assets.training import _link_train_file, _local, _responder, resume_file, training_options
from mmat_assets.config import AblationConfig, ProjectConfig
from mmat_assets.engine import ablation as ab
from mmat_assets.engine import evaluate as ev
from mmat_assets.engine import export as ex
from mmat_assets.engine import stages
from mmat_assets.engine.tools import available_tools
from mmat_assets.plugins import Registry, class_ref
from mmat_assets.resources import StorageResource
from mmat_assets.versions import TIMING_KEYS, doc_version, tree_version

GROUP = "ablation"
SPLIT = ["ablation", "split"]
UNTUNED_SEED = 0  # the untuned student is not trained: one evaluation serves every seed


def _benchmark(cfg: ProjectConfig, registry: Registry, a: AblationConfig) -> Any:
    entry = cfg.evaluation.benchmarks[a.benchmark]
    return registry.create("benchmark", entry.plugin or a.benchmark, entry.options, base_dir=cfg.base_dir)


def split_asset(cfg: ProjectConfig, registry: Registry, a: AblationConfig) -> dg.AssetsDefinition:
    @dg.asset(key=SPLIT, group_name=GROUP, io_manager_key="json_io_manager", code_version="1", kinds={"json"})
    def _asset(context: dg.AssetExecutionContext) -> dg.Output[dict[str, Any]]:
        """The held-out problems: a seeded split of the benchmark's item ids (ids only)."""
        ids = [item.item_id for item in _benchmark(cfg, registry, a).items()]
        held = ab.heldout_split(ids, a.heldout, a.split_seed)
        out = {"benchmark": a.benchmark, "seed": a.split_seed, "heldout": held, "n": len(held), "of": len(ids)}
        return dg.Output(out, data_version=dg.DataVersion(doc_version(out)),
                         metadata={"heldout": len(held), "of": len(ids), "seed": a.split_seed})

    return _asset


def data_asset(cfg: ProjectConfig, registry: Registry, variant: str) -> dg.AssetsDefinition:
    @dg.asset(key=["ablation", "data", variant], group_name=GROUP, io_manager_key="json_io_manager",
              code_version="2", kinds={"json"},
              ins={"rr": dg.AssetIn("rr_samples"), "orr": dg.AssetIn("orr_samples"), "split": dg.AssetIn(SPLIT),
                   "student": dg.AssetIn("student_base")},
              description=f"Training data of the {variant!r} variant, held-out problems left out, "
                          "pre-flighted against the student's template as the exports are.")
    def _asset(context: dg.AssetExecutionContext, storage: StorageResource, rr: dict[str, pl.DataFrame],
               orr: dict[str, pl.DataFrame], split: dict[str, Any],
               student: dict[str, Any]) -> dg.Output[dict[str, Any]]:
        rr_df, orr_df = stages.concat_shards(rr), stages.concat_shards(orr)
        held = set(split["heldout"])
        orr_turns = {r["sample_id"]: r["turns"] for r in orr_df.iter_rows(named=True)} if orr_df.height else {}
        fmt = "orr" if variant == "orr" else "rr"
        media = storage.media()
        records, excluded, without = [], 0, 0
        for row in rr_df.iter_rows(named=True) if rr_df.height else []:
            if str(row["source_row_id"]) in held:
                excluded += 1
                continue
            turns = ab.variant_turns(variant, row["turns"], orr_turns.get(row["sample_id"]))
            if turns is None:
                without += 1
                continue
            records.append(ex.to_record({**row, "turns": turns, "format": fmt}, media.local_path))
        # a variant's dialogue is not the exported one (folded, stripped): the trainer must see
        # only records it takes whole, or the training stops at the first one it cannot encode
        records, rejected = ex.preflight(records, encoder_for(cfg, registry, student.get("path")))
        out = _local(storage, "ablation", "data", variant)
        version = ex.export_version(f"ablation-{variant}", "1", {fmt: records}, {})
        exporter = registry.create("exporter", cfg.training.exporter, base_dir=cfg.base_dir)
        files = exporter.export({fmt: records}, out, {"data_version": version})
        ex.write_jsonl(out / "rejected.jsonl", (r.__dict__ for r in rejected))
        manifest = {"variant": variant, "format": fmt, "files": files, "rows": len(records),
                    "heldout_excluded": excluded, "no_dialogue": without, "rejected": len(rejected),
                    "data_version": version}
        return dg.Output(manifest, data_version=dg.DataVersion(version), metadata={
            "rows": len(records), "heldout_excluded": excluded, "no_dialogue": without,
            "rejected": len(rejected), "path": str(out)})

    return _asset


def model_asset(cfg: ProjectConfig, registry: Registry, a: AblationConfig, variant: str,
                seed: int) -> dg.AssetsDefinition:
    t = cfg.training

    @dg.asset(key=["ablation", "models", variant, f"s{seed}"], group_name=GROUP, io_manager_key="json_io_manager",
              code_version=f"{__version__}+{t.trainer}-{registry.version('trainer', t.trainer)}", kinds={"pytorch"},
              ins={"data": dg.AssetIn(["ablation", "data", variant]), "student": dg.AssetIn("student_base")},
              description=f"The student trained on the {variant!r} variant, seed {seed} (same budget for all).")
    def _asset(context: dg.AssetExecutionContext, storage: StorageResource, data: dict[str, Any],
               student: dict[str, Any]) -> dg.Output[dict[str, Any]]:
        from mmat_assets.engine.training import run_training_pipes

        cls = registry.get("trainer", t.trainer).cls
        budget = {**t.options, **a.training, **({"seed": seed} if "seed" in cls.Options.model_fields else {})}
        options = training_options(cls, budget, student["path"])
        root = _local(storage, "ablation", "models", variant, f"s{seed}")
        train_dir, out_dir = root / "data", root / "model"
        train_dir.mkdir(parents=True, exist_ok=True)
        _link_train_file(Path(data["files"][data["format"]]), train_dir / "train.jsonl")
        reported = run_training_pipes(context, t.trainer, options, str(train_dir), str(out_dir),
                                      base_dir=cfg.base_dir, trainer_class=class_ref(cls)).get_materialize_result()
        metrics = {k: getattr(v, "value", v) for k, v in (reported.metadata or {}).items() if k != "loss_curve"}
        counter = configured_trainer(cfg, registry).token_counter(student["path"])
        meta = {"checkpoint": str(out_dir), **metrics, "variant": variant, "seed": seed, "training_config": options,
                "data_version": data["data_version"], "rows": data["rows"],
                "generation_limits": ev.limits_of_export(data["files"], counter)}
        weights = Path(str(meta["checkpoint"]))
        return dg.Output(meta, data_version=dg.DataVersion(tree_version(weights if weights.is_dir() else out_dir)),
                         metadata={"steps": meta.get("steps") or 0, "tokens_per_s": meta.get("tokens_per_s") or 0.0,
                                   "rows": data["rows"]})

    return _asset


def _limits_for_untuned(cfg: ProjectConfig, registry: Registry, student: dict[str, Any],
                        data: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The untuned student answers under the limits the variants' data sets (RR steps from
    the RR data, the ORR turn from the ORR data)."""
    counter = configured_trainer(cfg, registry).token_counter(student["path"])
    files: dict[str, str] = {}
    for name in sorted(data, key=lambda k: k not in ("data_rr", "data_orr")):  # the plain variants first
        d = data[name]
        files.setdefault(d["format"], d["files"][d["format"]])
    return ev.limits_of_export(files, counter)


def eval_asset(cfg: ProjectConfig, registry: Registry, a: AblationConfig, variant: str, seed: int,
               mode: str) -> dg.AssetsDefinition:
    trained = variant != "untuned"
    ins = {"split": dg.AssetIn(SPLIT), "student": dg.AssetIn("student_base")}
    if trained:
        ins["model"] = dg.AssetIn(["ablation", "models", variant, f"s{seed}"])
    else:  # its limits come from the data the others train on
        ins.update({f"data_{v}": dg.AssetIn(["ablation", "data", v]) for v in a.variants if v in ab.TRAINED})
    key = ["ablation", "evals", variant, *([f"s{seed}"] if trained else []), mode]
    deps = tool_keys(cfg, registry) if mode != "baseline" else []

    @dg.asset(key=key, group_name=GROUP, io_manager_key="json_io_manager", ins=ins, deps=deps, code_version="1",
              kinds={"pytorch"}, description=f"The {variant!r} student on the held-out problems in {mode} mode.")
    def _asset(context: dg.AssetExecutionContext, storage: StorageResource, **inputs: Any) -> dg.Output[dict[str, Any]]:
        e, held = cfg.evaluation, set(inputs["split"]["heldout"])
        items = [i for i in _benchmark(cfg, registry, a).items() if i.item_id in held]
        model = inputs.get("model")
        recorded = model["generation_limits"] if model else _limits_for_untuned(
            cfg, registry, inputs["student"], {k: v for k, v in inputs.items() if k.startswith("data_")})
        harness = ev.Harness(available_tools(registry, cfg), None, tuple(e.orr_tools), e.max_steps,
                             limits=ev.Limits.of(recorded, e.max_new_tokens, e.token_cap), batch_size=e.batch_size)
        respond = _responder(configured_trainer(cfg, registry), inputs["student"], model, e.max_new_tokens)
        resume = resume_file(storage, cfg, key, mode, inputs["student"], model, harness, items)
        results = ev.evaluate(respond, _benchmark(cfg, registry, a), items, mode, harness,
                              _local(storage, "eval", "images"),
                              lambda n: context.log.info(f"{'/'.join(key)}: {n}/{len(items)}"), resume=resume)
        resume.unlink(missing_ok=True)  # every batch is in the output now
        out = {"variant": variant, "seed": seed if trained else UNTUNED_SEED, "mode": mode, **ev.summary(results),
               "limits": harness.limits.__dict__, "results": [r.__dict__ for r in results],
               "tokens_per_s": (model or {}).get("tokens_per_s"), "train_steps": (model or {}).get("steps")}
        return dg.Output(out, data_version=dg.DataVersion(doc_version(out, TIMING_KEYS)), metadata={
            "score": out["score"], "items": out["items"], "latency_s": out["latency_s"],
            "bad_steps": out["bad_steps"], "cut_steps": out["cut_steps"]})

    return _asset


def _cell(out: dict[str, Any]) -> ab.Cell:
    results = out["results"]
    return ab.Cell(out["variant"], int(out["seed"]), out["mode"], {r["item_id"]: float(r["score"]) for r in results},
                   {r["item_id"]: bool(r.get("choice")) for r in results}, float(out["latency_s"]),
                   out.get("tokens_per_s"), out.get("train_steps"))


def report_asset(cfg: ProjectConfig, a: AblationConfig, keys: list[list[str]]) -> dg.AssetsDefinition:
    ins = {"_".join(k[2:]): dg.AssetIn(k) for k in keys}
    ins["split"] = dg.AssetIn(SPLIT)

    @dg.asset(group_name=GROUP, io_manager_key="json_io_manager", ins=ins, code_version="1", kinds={"markdown"})
    def ablation_report(context: dg.AssetExecutionContext, storage: StorageResource,
                        **inputs: Any) -> dg.Output[dict[str, Any]]:
        """Every variant on the held-out split: accuracy with 95% bootstrap intervals, the
        gain over the untuned student with its paired interval, free text vs multiple
        choice, latency per sample, training throughput (the paper's Table 5)."""
        split = inputs.pop("split")
        rows = ab.report_rows([_cell(v) for v in inputs.values()], a.bootstrap)
        header = (f"Held-out split: {split['n']} of {split['of']} `{split['benchmark']}` problems "
                  f"(seed {split['seed']}), in no variant's training data. Accuracy in %, "
                  f"95% bootstrap intervals ({a.bootstrap} resamples) in brackets.\n")
        table = ab.report_markdown(rows, header)
        path = _local(storage, "reports", "ablation.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table + "\n", encoding="utf-8")
        out = {"rows": rows, "path": str(path), "split": {k: v for k, v in split.items() if k != "heldout"}}
        return dg.Output(json.loads(json.dumps(out)), data_version=dg.DataVersion(doc_version(out, TIMING_KEYS)),
                         metadata={"report": dg.MetadataValue.md(table), "path": dg.MetadataValue.path(str(path)),
                                   "mmat/summary": f"{table}\n({path})"})

    return ablation_report


def build(cfg: ProjectConfig, registry: Registry) -> list[dg.AssetsDefinition]:
    a = cfg.ablation
    if a is None or not cfg.sources:
        return []
    unknown = [v for v in a.variants if v not in ab.VARIANTS]
    if unknown:
        raise ValueError(f"ablation.variants: unknown {unknown} (have {list(ab.VARIANTS)})")
    trained = [v for v in a.variants if v in ab.TRAINED]
    assets = [split_asset(cfg, registry, a)] + [data_asset(cfg, registry, v) for v in trained]
    keys: list[list[str]] = []
    for v in a.variants:
        seeds = a.seeds if v in ab.TRAINED else [UNTUNED_SEED]
        for seed in seeds:
            if v in ab.TRAINED:
                assets.append(model_asset(cfg, registry, a, v, seed))
            for mode in ab.modes_of(v, a.variants):
                assets.append(eval_asset(cfg, registry, a, v, seed, mode))
                keys.append(["ablation", "evals", v, *([f"s{seed}"] if v in ab.TRAINED else []), mode])
    return assets + [report_asset(cfg, a, keys)]
