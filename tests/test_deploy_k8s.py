"""Runs on Kubernetes: the instance of ``infra/k8s/dagster.yaml`` (a ``K8sRunLauncher``) loads in
a pod's environment, and the Job it builds for a run, through dagster-k8s's own construction,
names the code location's image, the env from the Secret, the run's resources and, for
training, the GPU nodes. The Job is checked as the ``kubernetes`` client's ``V1Job``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
IMAGE = "registry.example.com/mmat:0.1.0"


def test_k8s_yaml_is_the_base_instance_plus_its_launcher() -> None:
    base = yaml.safe_load((REPO / "infra" / "dagster.yaml").read_text())
    k8s = yaml.safe_load((K8S / "dagster.yaml").read_text())
    assert {k: v for k, v in k8s.items() if k != "run_launcher"} == base
    assert k8s["run_launcher"]["class"] == "K8sRunLauncher"


def test_helm_values_render_the_same_instance() -> None:
    """values.yaml asks the chart for what infra/k8s/dagster.yaml holds."""
    values = yaml.safe_load((K8S / "values.yaml").read_text())
    instance = yaml.safe_load((K8S / "dagster.yaml").read_text())
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    mine = instance["run_launcher"]["config"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert [s["name"] for s in launcher["envSecrets"]] == mine["env_secrets"]
    assert [c["name"] for c in launcher["envConfigMaps"]] == mine["env_config_maps"]
    assert launcher["runK8sConfig"]["containerConfig"] == mine["run_k8s_config"]["container_config"]
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    coordinator = instance["run_coordinator"]["config"]
    assert queued["maxConcurrentRuns"] == coordinator["max_concurrent_runs"]
    assert queued["tagConcurrencyLimits"] == coordinator["tag_concurrency_limits"]
    assert values["additionalInstanceConfig"]["concurrency"] == instance["concurrency"]
    # run monitoring, in the chart's camelCase
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    assert {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in monitoring.items()} == instance["run_monitoring"]
    (code,) = values["dagster-user-deployments"]["deployments"]
    assert [s["name"] for s in code["envSecrets"]] == mine["env_secrets"]
    assert {e["name"]: e["value"] for e in code["env"]}["MMAT_PROFILE"] == "prod"
    assert code["dagsterApiGrpcArgs"][:2] == ["--python-file", "/opt/mmat/definitions.py"]


def _project(tmp: Path) -> Path:
    path = tmp / "mmat.yaml"
    path.write_text(yaml.safe_dump({
        "sources": {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}}, "foundation": {"shards": 2},
        "profiles": {"local": {"root": "store"}},
        "deployment": {"gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}}))
    return path


@pytest.fixture()
def pod_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What a pod has: the service-account token and CA, the API server's address, and the
    instance yaml in DAGSTER_HOME (SQLite storage and local logs here, the launcher as is)."""
    import kubernetes.config
    from kubernetes.config.incluster_config import InClusterConfigLoader

    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token-of-the-pod")
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda **kw: InClusterConfigLoader(
        token_filename=str(account / "token"), cert_filename=str(account / "ca.crt")).load_and_set())
    home = tmp_path / "home"
    home.mkdir()
    doc = yaml.safe_load((K8S / "dagster.yaml").read_text())
    doc["storage"] = {"sqlite": {"base_dir": str(home)}}
    doc.pop("compute_logs")
    (home / "dagster.yaml").write_text(yaml.safe_dump(doc))
    for k, v in {"DAGSTER_HOME": str(home), "MMAT_CONFIG": str(_project(tmp_path)), "MMAT_PROFILE": "local",
                 "MMAT_K8S_NAMESPACE": "mmat"}.items():
        monkeypatch.setenv(k, v)
    return home


def _as_v1job(job: Any) -> Any:
    """Through JSON and back into the client's model, as the API server would hand it over."""
    from kubernetes.client import ApiClient

    class _Response:
        data = json.dumps(ApiClient().sanitize_for_serialization(job))

    return ApiClient().deserialize(_Response(), "V1Job")


def test_k8s_launcher_builds_the_job_of_each_run(pod_env: Path) -> None:
    from dagster._core.test_utils import in_process_test_workspace
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster_k8s import K8sRunLauncher
    from kubernetes.client import V1Job

    from mmat_assets.assets import definitions_from_file

    instance = dg.DagsterInstance.from_config(str(pod_env))
    launcher = instance.run_launcher
    assert isinstance(launcher, K8sRunLauncher)
    # the daemon asks the launcher after each run's Job: one whose pod died is marked failed
    assert instance.run_monitoring_enabled and launcher.supports_check_run_worker_health
    created: list[tuple[Any, str]] = []
    # the API server: takes the Job the launcher built (nothing runs here)
    launcher._api_client.create_namespaced_job_with_retries = lambda body, namespace: created.append((body, namespace))
    defs = definitions_from_file(str(pod_env.parent / "mmat.yaml"), "local")
    # the teacher stage is in the pool whose limit the instance sets
    assert [defs.resolve_assets_def(k).op.pool for k in ("rationales", "reflections")] == ["teacher", "teacher"]
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 4
    origin = LoadableTargetOrigin(python_file=str(REPO / "definitions.py"), working_directory=str(REPO),
                                  executable_path=sys.executable)
    sys.modules.pop("definitions", None)  # loaded afresh for this project, not one imported before
    with in_process_test_workspace(instance, origin, container_image=IMAGE) as workspace:
        repo = workspace.get_code_location(workspace.code_location_names[0]).get_repository("__repository__")
        runs = {}
        for name, tags in (("foundation_shards", {"dagster/partition": "0"}), ("training", {})):
            remote = repo.get_full_job(name)
            run = instance.create_run_for_job(defs.resolve_job_def(name), tags={**remote.run_tags, **tags},
                                              remote_job_origin=remote.get_remote_origin(),
                                              job_code_origin=remote.get_python_origin())
            instance.launch_run(run.run_id, workspace)
            runs[name] = run

    assert [ns for _, ns in created] == ["mmat", "mmat"]
    jobs = {name: _as_v1job(body) for name, (body, _) in zip(runs, created)}
    for name, job in jobs.items():
        assert isinstance(job, V1Job)
        pod = job.spec.template.spec
        (container,) = pod.containers
        assert container.image == IMAGE
        assert container.args[:3] == ["dagster", "api", "execute_run"]
        assert [e.secret_ref.name for e in container.env_from if e.secret_ref] == ["mmat-secrets"]
        assert [e.config_map_ref.name for e in container.env_from if e.config_map_ref] == ["mmat-env"]
        assert pod.service_account_name == "mmat-run"
        assert job.metadata.labels["dagster/run-id"] == runs[name].run_id
    shard = jobs["foundation_shards"].spec.template.spec
    assert shard.containers[0].resources.requests == {"cpu": "2000m", "memory": "8192Mi"}  # deployment.runs
    assert not shard.node_selector
    train = jobs["training"].spec.template.spec
    assert train.containers[0].resources.limits == {"cpu": "8000m", "memory": "32768Mi", "nvidia.com/gpu": "1"}
    assert train.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}  # from mmat.yaml
    assert [t.key for t in train.tolerations] == ["nvidia.com/gpu"]
