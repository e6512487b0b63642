"""The project configuration file (``mmat.yaml``): typed, with a description per field.

Relative paths in it resolve against the file's own directory, so a config travels with
its project. A config may start from another in the same folder (``extends: micro.yaml``)
and change only what differs. Loaded by the composition root, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Model):
    """One configured source: which plugin reads it and with what options."""

    plugin: str = Field(description="Registered source name, e.g. 'tabmwp' or 'qa_table'.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Options of the source plugin (its data path...)."
    )
    quota: int | dict[str, int] | None = Field(
        default=None,
        description="Max rows kept per subset (an int for every subset, or per subset name); "
        "chosen by a seeded hash so reruns keep the same rows.",
    )


class ComponentConfig(_Model):
    """A configured tool, retriever, teacher... : which implementation, with what options."""

    plugin: str | None = Field(
        default=None, description="Registered implementation name; defaults to the entry's key."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Implementation options.")
    enabled: bool = Field(default=True, description="False leaves it out of the asset graph.")


class ToolConfig(ComponentConfig):
    """A configured tool, plus the limits of each call the engine makes to it."""

    timeout_s: float = Field(
        default=120.0, gt=0, le=86_400,
        description="Seconds one call may run; a call still running then becomes an error "
        "result for that call (not cached), and the sample goes on.",
    )
    max_result_chars: int = Field(
        default=16_384, ge=1, le=10_000_000,
        description="Longest result text kept, in characters (also the cap on the JSON of "
        "its data); longer text is cut and marked '… [truncated N characters]'. Part of "
        "the tool cache key, since it changes what a call returns.",
    )


class FoundationConfig(_Model):
    """How Foundation shards, samples and validates."""

    shards: int = Field(default=8, ge=1, le=100_000, description="Number of shards.")
    shards_per_run: int = Field(
        default=4, ge=1, le=10_000,
        description="Shards one run covers when a backfill (the UI's, or `mmat build --launch`) runs "
        "the shard assets: a backfill of N shards is ceil(N / shards_per_run) runs.",
    )
    seed: int = Field(default=42, description="Seed of the per-subset quota sampling.")
    max_image_pixels: int = Field(
        default=50_000_000, description="Larger images are quarantined (decompression bombs)."
    )
    max_image_side: int = Field(default=16_384, description="Longest side allowed, pixels.")
    min_image_side: int = Field(default=1, description="Shortest side allowed, pixels.")
    preview_rows: int = Field(default=5, description="Samples rendered in the UI preview.")


class StagesConfig(_Model):
    """Rationale, reflection and integration: who teaches, with what, and how hard."""

    teacher: str = Field(default="grounded", description="Key in `teachers` (or a registered teacher name).")
    retriever: str | None = Field(default=None, description="Key in `retrievers` used for RAG; None: no search.")
    judge: str | None = Field(default=None, description="Quality judge (e.g. teacher_judge) that scores "
                              "passed dialogues 0-1; None: no scores.")
    max_steps: int = Field(default=6, ge=1, le=50, description="Step limit of the teacher loop.")
    rag_k: int = Field(default=3, ge=1, le=20, description="Passages fed back per search.")
    concurrency: int = Field(default=16, ge=1, le=1024, description="Samples in flight per shard.")
    tool_concurrency: int = Field(default=2, ge=1, le=64, description="Tool calls running at once per shard.")
    lease_s: float = Field(default=30.0, gt=0, le=3600, description="Lease on a claimed teacher request or "
                           "tool call: renewed while its holder lives, taken over this long after it died.")
    lease_wait_s: float = Field(default=900.0, gt=0, description="Longest wait for another live process's "
                                "answer to a request it claimed; the sample fails after that.")
    preview_rows: int = Field(default=3, description="Dialogues rendered in the UI preview.")
    budget_usd: float | None = Field(
        default=None, gt=0, description="Spending cap in USD over every teacher request the request "
        "caches recorded, all shards and processes together (None: no cap). Checked before each new "
        "request: at the cap nothing more is sent, requests in flight finish, finished rows are "
        "written, the rest end `budget_exhausted` and `mmat build` exits 3. Raise it and rerun to "
        "resume; nothing answered is asked again. `mmat build --budget` overrides it.",
    )
    teacher_rpm: float | None = Field(default=None, gt=0, description="The teacher account's requests "
                                      "per minute, for `mmat estimate`'s wall time (None: unlimited).")
    teacher_tpm: float | None = Field(default=None, gt=0, description="The teacher account's tokens per "
                                      "minute, for `mmat estimate`'s wall time (None: unlimited).")
    max_failure_rate: float = Field(
        default=0.5, ge=0, le=1,
        description="Share of an asset's rows that may fail (a source's quarantined rows, a stage's "
        "failed rows) before `mmat build` exits non-zero naming it; a stage where every row failed "
        "fails the build whatever this says.",
    )


class ExportConfig(_Model):
    """What the exporters take, and the student whose template pre-flight checks against."""

    exporters: list[str] | None = Field(default=None, description="Exporters to run (None: every registered one).")
    formats: list[str] = Field(default_factory=lambda: ["rr", "orr"], description="Which of rr / orr to export.")
    filter: dict[str, Any] = Field(default_factory=dict, description="ExportFilter fields: sources, licenses, "
                                   "commercial_only, min_quality, used_rag, reflected.")
    max_length: int = Field(default=2048, description="Max tokens per record for the target student.")
    student: str = Field(default="offline", description="Student for pre-flight and training: 'offline' (LLaVA "
                         "with SmolLM2-135M, built locally), a hub id or a local path.")


class TrainingConfig(_Model):
    """The training run (SPEC §3 defaults) and the evaluation after it."""

    trainer: str = Field(default="hf_lora", description="Registered trainer.")
    data: str = Field(default="rr", description="Which export trains the student: rr or orr.")
    exporter: str = Field(default="ms_swift", description="Exporter whose files the trainer reads.")
    options: dict[str, Any] = Field(default_factory=dict, description="Trainer options (lr, max_steps, ...).")


class EvaluationConfig(_Model):
    """Which benchmarks and modes the base and tuned students are scored on."""

    benchmarks: dict[str, ComponentConfig] = Field(default_factory=dict, description="Benchmarks by name.")
    modes: list[str] = Field(default_factory=lambda: ["baseline", "orr", "rr"], description="Harness modes.")
    limit: int | None = Field(default=None, description="Items per benchmark (None: all).")
    exclude_training_rows: bool = Field(default=True, description="Skip items whose id the training export holds.")
    max_steps: int = Field(default=6, description="Step cap of the RR agent loop.")
    max_new_tokens: int = Field(default=64, description="Tokens per generation where the model records no "
                                "limits sized from its training data (see evaluate.generation_limits).")
    batch_size: int = Field(default=8, ge=1, description="Problems whose generations are batched together.")
    token_cap: int | None = Field(default=None, ge=1, description="Upper bound on every generation's tokens "
                                  "(bounded runs; steps it cuts count as cut_steps). None: the limits from the data.")
    orr_tools: list[str] = Field(default_factory=lambda: ["ocr"], description="Tools run before an ORR generation.")


class AblationConfig(_Model):
    """The ablation matrix (the paper's Table 5): training variants of one set of
    rationales, each trained with the same budget and scored on a held-out split."""

    variants: list[str] = Field(default_factory=lambda: ["untuned", "rr", "orr", "rr_no_reflection", "rr_no_tools"],
                                description="Variants: untuned, rr, orr, rr_no_reflection, rr_no_tools.")
    seeds: list[int] = Field(default_factory=lambda: [42], description="Training seeds; each variant trains once per seed.")
    benchmark: str = Field(description="Evaluation benchmark (under evaluation.benchmarks) whose items hold the "
                           "held-out problems; its item ids are the sources' row ids.")
    heldout: int = Field(default=250, ge=1, description="Held-out problems, chosen by a seeded split of item ids; "
                         "rows of these problems are left out of every variant's training data.")
    split_seed: int = Field(default=42, description="Seed of the held-out split.")
    training: dict[str, Any] = Field(default_factory=dict, description="Trainer options for every variant, over "
                                     "training.options (the budget: max_steps, learning_rate, ...).")
    bootstrap: int = Field(default=2000, ge=100, description="Bootstrap resamples for the intervals.")


class ProfileConfig(_Model):
    """Where a profile keeps tables and media."""

    root: str = Field(description="Local directory or s3://bucket/prefix.")
    endpoint_url_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding an S3-compatible endpoint URL.",
    )


class RunSize(_Model):
    """The machine one run of a job gets on a cluster (ECS task size, Kubernetes resources)."""

    cpu: int = Field(ge=256, le=196_608, description="CPU units, 1024 = one vCPU (ECS `cpu`; "
                     "Kubernetes requests and limits in millicores).")
    memory: int = Field(ge=512, le=1_048_576, description="Memory in MiB.")
    gpus: int = Field(default=0, ge=0, le=16, description="GPUs; a run with any is placed on GPU "
                      "nodes (Kubernetes: deployment.gpu_node_selector; ECS: a GPU resource requirement).")


def _default_run_sizes() -> dict[str, RunSize]:
    return {"foundation": RunSize(cpu=2048, memory=8192), "teacher": RunSize(cpu=4096, memory=16384),
            "training": RunSize(cpu=8192, memory=32768, gpus=1)}


class DeploymentConfig(_Model):
    """How big a run of each job is when the instance launches it on ECS or Kubernetes."""

    runs: dict[str, RunSize] = Field(
        default_factory=_default_run_sizes,
        description="Per job: foundation (foundation shards), teacher (rationale, reflection and "
        "integration shards: teacher requests and their OCR and other tool calls), training (student "
        "training); a job left out takes the run launcher's default size.",
    )
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="Kubernetes node labels of the GPU nodes that runs with gpus > 0 go to.",
    )
    executor: Literal["in_process", "multiprocess"] = Field(
        default="in_process",
        description="How a launched run (UI, backfill, `mmat build --launch`) executes its steps: in_process "
        "(Dagster's in_process_executor: every step in the run worker's own process, one after another) or "
        "multiprocess (Dagster's default: a new Python process per step, seconds of start-up each, steps "
        "in parallel). Any run launcher (default, ECS, Kubernetes) starts the run worker either way.",
    )


class ProjectConfig(_Model):
    """The whole ``mmat.yaml``."""

    sources: dict[str, SourceConfig] = Field(description="Configured sources by asset name.")
    foundation: FoundationConfig = Field(default_factory=FoundationConfig)
    tools: dict[str, ToolConfig] = Field(
        default_factory=dict,
        description="Options per tool; every registered tool gets an asset, these only configure.",
    )
    retrievers: dict[str, ComponentConfig] = Field(
        default_factory=dict, description="Configured retrievers by asset name."
    )
    teachers: dict[str, ComponentConfig] = Field(
        default_factory=lambda: {"grounded": ComponentConfig(plugin="grounded")},
        description="Configured teachers by name; `stages.teacher` picks one.",
    )
    stages: StagesConfig = Field(default_factory=StagesConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    profiles: dict[str, ProfileConfig] = Field(
        default_factory=lambda: {"local": ProfileConfig(root=".mmat")},
        description="Storage per profile (local, prod).",
    )
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    ablation: AblationConfig | None = Field(default=None, description="The ablation matrix; none: no ablation assets.")
    base_dir: Path = Field(default=Path("."), exclude=True, description="Directory of the file.")

    def resolve(self, path: str | Path) -> Path:
        """A path from the config, resolved against the config file's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def profile_root(self, profile: str) -> str:
        try:
            root = self.profiles[profile].root
        except KeyError:
            raise KeyError(f"no profile {profile!r} in config (have: {sorted(self.profiles)})") from None
        return root if "://" in root else str(self.resolve(root))


#: Overrides ``stages.budget_usd`` when set: how `mmat build --budget` reaches the processes
#: that load the project (its workers), read when a config is loaded.
BUDGET_ENV = "MMAT_BUDGET_USD"


#: The key naming the config a file starts from; its own keys then override that one's.
EXTENDS = "extends"


class ConfigError(ValueError):
    """A config file that cannot be read as a whole (a broken ``extends:`` chain)."""


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it: mappings merge key by key, anything else
    (a list, a scalar, null) replaces the base's value whole."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a config file with its ``extends:`` chain folded in."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or EXTENDS not in data:
        return data  # a non-mapping fails validation, as before
    name = data.pop(EXTENDS)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: {EXTENDS} names a config file, got {name!r}")
    base = (path.parent / name).resolve()
    if base.parent != path.parent:  # the base's relative paths must mean what they mean in it
        raise ConfigError(f"{path}: {EXTENDS}: {name} is not in the same folder; paths in both "
                          "files resolve against the folder of the file loaded")
    if base in chain or base == path:
        raise ConfigError(f"{path}: {EXTENDS} loops: " + " -> ".join(p.name for p in (*chain, path, base)))
    if not base.is_file():
        raise ConfigError(f"{path}: {EXTENDS}: no config file {base.name} beside it")
    return merged(_read(base, (*chain, path)), data)


def load_config(path: str | Path) -> ProjectConfig:
    """Read and validate a project config file, with the file it ``extends`` (if any) under
    it; ``$MMAT_BUDGET_USD`` overrides the budget."""
    path = Path(path).resolve()
    data = _read(path)
    if os.environ.get(BUDGET_ENV):
        data.setdefault("stages", {})["budget_usd"] = os.environ[BUDGET_ENV]
    cfg = ProjectConfig.model_validate(data)
    cfg.base_dir = path.parent
    return cfg
