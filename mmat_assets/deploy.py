"""What a cluster deployment needs from the code: the jobs whose runs carry their machine size,
the executor of launched runs, the teacher pool, and a check that stops a misconfigured
deployment when the code location loads.

A run's size travels as run tags that Dagster's own launchers read: ``ecs/cpu`` and
``ecs/memory`` (``EcsRunLauncher``) and ``dagster-k8s/config`` (``K8sRunLauncher``). The check
reads the instance's ``dagster.yaml`` (``$DAGSTER_HOME``) and the profile's storage root, and
turns the first thing wrong into one line: a variable that is not set, a PostgreSQL that does
not answer, a bucket that does not exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from mmat_assets.config import DeploymentConfig, ProjectConfig, RunSize

#: Dagster pool of the teacher-stage assets: the instance's pool limit (infra/dagster.yaml) caps how
#: many of their steps run at once over every run, so parallel runs share one provider limit.
TEACHER_POOL = "teacher"
#: Seconds any one probe of the deployment check may take (a dead host must not hang the load).
PROBE_TIMEOUT_S = 5

#: Per `deployment.runs` entry: its job's name, the asset groups it runs, whether only their
#: shard-partitioned assets (a job runs one shard or batch; the whole-table assets after the
#: shards, like dialogue_files, run once, not once per shard), and its description.
JOBS: dict[str, tuple[str, tuple[str, ...], bool, str]] = {
    "foundation": ("foundation_shards", ("foundation",), True,
                   "Foundation shards: images decoded, checked and stored, rows deduplicated."),
    "teacher": ("teacher_shards", ("rationale", "reflection", "integration"), True,
                "Teacher shards: rationales (teacher requests and their OCR and other tool calls), "
                "reflections and the RR / ORR samples."),
    "training": ("training", ("training",), False, "The student: its base and its training."),
}

#: ``deployment.executor``: how a launched run executes its steps. in_process runs them in the run
#: worker that the launcher started (a local subprocess, an ECS task, a Kubernetes Job's pod);
#: multiprocess starts a Python process per step, which imports Dagster and the project again
#: (seconds each, and a shard run's assets and checks are many steps).
EXECUTORS: dict[str, dg.ExecutorDefinition] = {"in_process": dg.in_process_executor,
                                               "multiprocess": dg.multiprocess_executor}


class DeploymentError(Exception):
    """A deployment that cannot work; the message is one line naming what is wrong."""


def k8s_config(size: RunSize, gpu_node_selector: Mapping[str, str]) -> dict[str, Any]:
    """The ``dagster-k8s/config`` of a run of this size: resources, and GPU nodes if it has GPUs."""
    amount = {"cpu": f"{size.cpu * 1000 // 1024}m", "memory": f"{size.memory}Mi"}
    if size.gpus:
        amount["nvidia.com/gpu"] = str(size.gpus)
    config: dict[str, Any] = {"container_config": {"resources": {"requests": amount, "limits": dict(amount)}}}
    if size.gpus:
        # GPU nodes are usually tainted so that only GPU work lands there
        config["pod_spec_config"] = {"node_selector": dict(gpu_node_selector), "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    return config


def run_tags(size: RunSize, gpu_node_selector: Mapping[str, str]) -> dict[str, str]:
    """Run tags that size a run on ECS (task CPU/memory, GPUs) and on Kubernetes."""
    tags = {"ecs/cpu": str(size.cpu), "ecs/memory": str(size.memory),
            "dagster-k8s/config": json.dumps(k8s_config(size, gpu_node_selector), sort_keys=True)}
    if size.gpus:
        tags["ecs/container_overrides"] = json.dumps(
            {"resourceRequirements": [{"type": "GPU", "value": str(size.gpus)}]})
    return tags


def _job_keys(assets: list[dg.AssetsDefinition], groups: tuple[str, ...], shards_only: bool) -> list[dg.AssetKey]:
    return [key for a in assets for key in a.keys
            if a.group_names_by_key.get(key) in groups and (a.partitions_def is not None or not shards_only)]


#: Run statuses whose run worker is (or is about to be) a live process.
ACTIVE_RUNS = ("STARTING", "STARTED")


def local_run_threads(instance: dg.DagsterInstance, processes_per_run: int = 1) -> int | None:
    """The threads a launched run's models may use when the instance starts its runs as
    processes on this machine (Dagster's ``DefaultRunLauncher``): this machine's cores shared
    by the runs active now (this one counted) times each run's step processes. None where
    nothing needs dividing: one run of one process, a user's own ``MMAT_CPU_THREADS``, or a
    launcher that starts each run on its own machine (ECS, Kubernetes), whose CPU quota
    :func:`~mmat_assets.toolkit.cpu.cpu_threads` reads in the run itself.

    The daemon dequeues up to ``max_concurrent_runs`` runs at once (Dagster's default is 10), and
    each would otherwise start a thread per core for its OCR and torch models (four runs on 2
    cores: 8 threads), the oversubscription that ``--workers`` avoids the same way.
    """
    from mmat_assets.toolkit.cpu import THREADS_ENV, worker_share

    if os.environ.get(THREADS_ENV, "").strip() or not _launches_local_processes(instance):
        return None
    statuses = [dg.DagsterRunStatus[name] for name in ACTIVE_RUNS]
    active = max(1, len(instance.get_run_ids(filters=dg.RunsFilter(statuses=statuses))))
    processes = active * max(1, processes_per_run)
    return worker_share(processes) if processes > 1 else None


def _launches_local_processes(instance: dg.DagsterInstance) -> bool:
    """Whether the instance's run launcher is Dagster's default, read from its configuration:
    making a launcher to ask it can call out (``EcsRunLauncher`` reads its task definition)."""
    if instance.is_ephemeral:  # an in-process build's instance: its runs are not launched
        return False
    data = instance.get_ref().run_launcher_data
    return data is None or data.class_name == "DefaultRunLauncher"


def _sized(base: dg.ExecutorDefinition) -> dg.ExecutorDefinition:
    """``base``, which first limits the run's threads to :func:`local_run_threads`: the executor
    is made in the run worker before any step runs, so before any model sizes its pool."""
    from mmat_assets.toolkit.cpu import cores, limit_threads

    create = base.executor_creation_fn
    assert create is not None

    def sized(init_context: Any) -> Any:
        steps = 1
        if base.name == "multiprocess":  # its steps run side by side, as many as it is allowed
            steps = int(init_context.executor_config.get("max_concurrent") or 0) or cores()
        threads = local_run_threads(init_context.instance, steps)
        if threads is not None:
            limit_threads(threads)
        return create(init_context)

    return dg.ExecutorDefinition(name=base.name, config_schema=base.config_schema.as_field(),
                                 requirements=base.get_requirements, executor_creation_fn=sized,
                                 description=base.description)


def run_executor(deployment: DeploymentConfig) -> dg.ExecutorDefinition:
    """The executor of every launched run (a backfill's, and each job's of :func:`deployment_jobs`),
    sizing a local run's thread pools first (:func:`local_run_threads`)."""
    return _sized(EXECUTORS[deployment.executor])


def deployment_jobs(deployment: DeploymentConfig,
                    assets: list[dg.AssetsDefinition]) -> list[dg.UnresolvedAssetJobDefinition]:
    """One job per sized kind of run; launching it (UI, schedule, backfill) sizes its runs."""
    jobs = []
    for kind, (name, groups, shards_only, description) in JOBS.items():
        keys = _job_keys(assets, groups, shards_only)
        size = deployment.runs.get(kind)
        if keys:
            tags = run_tags(size, deployment.gpu_node_selector) if size else None
            jobs.append(dg.define_asset_job(name, selection=keys, description=description, tags=tags))
    return jobs


# --- the check at load time -------------------------------------------------------------------

def env_refs(node: Any) -> Iterator[str]:
    """Every variable a dagster.yaml reads (``{env: NAME}``), in order of appearance."""
    if isinstance(node, Mapping):
        if set(node) == {"env"} and isinstance(node["env"], str):
            yield node["env"]
            return
        for value in node.values():
            yield from env_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from env_refs(value)


def _resolve(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, Mapping):
        if set(node) == {"env"}:
            return environ[node["env"]]
        return {k: _resolve(v, environ) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, environ) for v in node]
    return node


def instance_yaml(environ: Mapping[str, str]) -> Path | None:
    """The instance configuration this process runs with, if it has one."""
    home = environ.get("DAGSTER_HOME")
    path = Path(home) / "dagster.yaml" if home else None
    return path if path is not None and path.is_file() else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_postgres(db: Mapping[str, Any], source: str) -> None:
    """Connect once to the instance's PostgreSQL; a refusal or a bad login is the error."""
    import psycopg2

    where = db.get("postgres_url") or f"{db.get('hostname')}:{db.get('port', 5432)}/{db.get('db_name')}"
    try:
        if "postgres_url" in db:
            conn = psycopg2.connect(db["postgres_url"], connect_timeout=PROBE_TIMEOUT_S)
        else:
            conn = psycopg2.connect(host=db.get("hostname"), port=int(db.get("port", 5432)), user=db.get("username"),
                                    password=db.get("password"), dbname=db.get("db_name"),
                                    connect_timeout=PROBE_TIMEOUT_S)
    except psycopg2.Error as exc:
        raise DeploymentError(f"PostgreSQL at {where} (instance storage, {source}) does not answer: "
                              f"{_first_line(exc)}") from None
    conn.close()


def check_bucket(bucket: str, endpoint_url: str | None, what: str) -> None:
    """``bucket`` exists and these credentials may use it."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    config = Config(connect_timeout=PROBE_TIMEOUT_S, read_timeout=PROBE_TIMEOUT_S, retries={"max_attempts": 1})
    at = f" at {endpoint_url}" if endpoint_url else ""
    try:
        boto3.client("s3", endpoint_url=endpoint_url or None, config=config).head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise DeploymentError(f"S3 bucket {bucket!r} ({what}) does not exist{at}") from None
        raise DeploymentError(f"S3 bucket {bucket!r} ({what}){at} refused access: {_first_line(exc)}") from None
    except BotoCoreError as exc:  # no credentials, endpoint unreachable
        raise DeploymentError(f"S3 bucket {bucket!r} ({what}){at} cannot be reached: {_first_line(exc)}") from None


def _bucket_of(url: str) -> str:
    return url.removeprefix("s3://").split("/", 1)[0]


def check_instance(path: Path, environ: Mapping[str, str]) -> None:
    """The variables the instance yaml reads are set, and its PostgreSQL and log bucket answer."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    missing = [name for name in dict.fromkeys(env_refs(doc)) if name not in environ]
    if missing:
        raise DeploymentError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set "
                              f"(read by the Dagster instance configuration {path})")
    doc = _resolve(doc, environ)
    db = (doc.get("storage") or {}).get("postgres", {}).get("postgres_db")
    if db:
        check_postgres(db, str(path))
    logs = doc.get("compute_logs") or {}
    if logs.get("class") == "S3ComputeLogManager":
        cfg = logs.get("config") or {}
        endpoint = cfg.get("endpoint_url") or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
        check_bucket(cfg["bucket"], endpoint, f"compute logs, {path}")


def check_deployment(cfg: ProjectConfig, profile: str, environ: Mapping[str, str]) -> None:
    """Everything the profile and the instance need is there; else DeploymentError (one line)."""
    path = instance_yaml(environ)
    if path is not None:
        check_instance(path, environ)
    root = cfg.profile_root(profile)
    if root.startswith("s3://"):
        prof = cfg.profiles[profile]
        endpoint = environ.get(prof.endpoint_url_env) if prof.endpoint_url_env else None
        check_bucket(_bucket_of(root), endpoint, f"storage root of profile {profile!r}")


def exit_if_misconfigured(cfg: ProjectConfig, profile: str, environ: Mapping[str, str]) -> None:
    """Stop the process loading the code location with one line when the deployment cannot work
    (a traceback would bury the one fact the operator needs)."""
    try:
        check_deployment(cfg, profile, environ)
    except DeploymentError as exc:
        raise SystemExit(f"mmat: profile {profile!r} is misconfigured: {exc}") from None
