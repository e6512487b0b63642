"""Runs on ECS: ``infra/ecs/dagster.yaml``'s ``EcsRunLauncher`` against moto's ECS, then the
task's own command run here, which proves the image's entry point materializes the shard.

The daemon's "current task" (whose cluster and subnets runs inherit) is a task started in
moto, and the ECS task-metadata endpoint that names it is a local HTTP server, as on ECS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import pytest
import yaml

from tests.tabmwp_subset import copy_tabmwp

REPO = Path(__file__).resolve().parents[1]
ECS_YAML = REPO / "infra" / "ecs" / "dagster.yaml"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/mmat:test"
SECRET_VALUE = "sk-never-in-a-task-definition"
PG_PASSWORD = "pg-never-in-a-task-definition"


def test_ecs_yaml_is_the_base_instance_plus_its_launcher() -> None:
    base = yaml.safe_load((REPO / "infra" / "dagster.yaml").read_text())
    ecs = yaml.safe_load(ECS_YAML.read_text())
    assert {k: v for k, v in ecs.items() if k != "run_launcher"} == base
    assert ecs["run_launcher"]["class"] == "EcsRunLauncher"
    # the roles' policies (placeholders in capitals are the variables of the same name)
    config = ecs["run_launcher"]["config"]
    execution = json.loads((ECS_YAML.parent / "execution-role-policy.json").read_text())
    secrets = next(s for s in execution["Statement"] if "secretsmanager:GetSecretValue" in s["Action"])
    assert sorted(secrets["Resource"]) == sorted(s["valueFrom"]["env"] for s in config["secrets"])
    daemon = json.loads((ECS_YAML.parent / "daemon-role-policy.json").read_text())
    passed = next(s for s in daemon["Statement"] if s["Action"] == "iam:PassRole")["Resource"]
    assert sorted(passed) == sorted(config["task_definition"][k]["env"] for k in ("task_role_arn", "execution_role_arn"))
    json.loads((ECS_YAML.parent / "task-role-policy.json").read_text())


class _Metadata(BaseHTTPRequestHandler):
    """The ECS task-metadata endpoint (v4) of the task the daemon runs in."""

    task: dict[str, str] = {}

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        body = json.dumps(self.task if self.path.endswith("/task") else {"Name": "daemon"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def metadata_endpoint() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Metadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def _project(tmp: Path, tabmwp_dir: Path) -> Path:
    copy_tabmwp(tabmwp_dir, tmp / "tabmwp", 6)
    path = tmp / "mmat.yaml"
    path.write_text(yaml.safe_dump({"sources": {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}},
                                    "foundation": {"shards": 2}, "profiles": {"local": {"root": "store"}}}))
    return path


def _home(tmp: Path) -> Path:
    """infra/ecs/dagster.yaml with its launcher as is; storage on SQLite and logs local here."""
    doc = yaml.safe_load(ECS_YAML.read_text())
    home = tmp / "home"
    home.mkdir()
    doc["storage"] = {"sqlite": {"base_dir": str(home)}}
    doc.pop("compute_logs")
    (home / "dagster.yaml").write_text(yaml.safe_dump(doc))
    return home


def _daemon_task(ecs: Any, ec2: Any) -> tuple[dict[str, Any], str]:
    """A task standing for the daemon's own: in an awsvpc subnet of the cluster."""
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})  # ENIs get private DNS names
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="mmat", Description="runs", VpcId=vpc)["GroupId"]
    ecs.create_cluster(clusterName="mmat")
    ecs.register_task_definition(family="dagster-daemon", networkMode="awsvpc", cpu="256", memory="512",
                                 containerDefinitions=[{"name": "daemon", "image": "dagster/dagster-celery-k8s",
                                                        "memory": 512}])
    task = ecs.run_task(cluster="mmat", taskDefinition="dagster-daemon", launchType="FARGATE", networkConfiguration={
        "awsvpcConfiguration": {"subnets": [subnet], "securityGroups": [group], "assignPublicIp": "DISABLED"}},
    )["tasks"][0]
    return task, subnet


def _fargate_resources(task_definition: Any) -> dict[str, Any]:
    """moto sums container-level memory even for Fargate, where only the task's is required
    (and is all the launcher sets); count the task's."""
    return {"CPU": int(task_definition.cpu or 0), "MEMORY": int(task_definition.memory or 0), "PORTS": [],
            "PORTS_UDP": []}


@pytest.fixture()
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from moto import mock_aws
    from moto.ecs.models import EC2ContainerServiceBackend

    monkeypatch.setattr(EC2ContainerServiceBackend, "_calculate_task_resource_requirements",
                        staticmethod(_fargate_resources))

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        yield


def _launch(instance: dg.DagsterInstance, workspace: Any, defs: dg.Definitions, job_name: str,
            partition: str | None) -> dg.DagsterRun:
    """Create a run of a job as the UI or the daemon would, and launch it through the instance."""
    location = workspace.get_code_location(workspace.code_location_names[0])
    remote = location.get_repository("__repository__").get_full_job(job_name)
    defs_job = defs.resolve_job_def(job_name)
    tags = {**remote.run_tags, **({"dagster/partition": partition} if partition else {})}
    run = instance.create_run_for_job(defs_job, tags=tags, remote_job_origin=remote.get_remote_origin(),
                                      job_code_origin=remote.get_python_origin())
    instance.launch_run(run.run_id, workspace)
    return instance.get_run_by_id(run.run_id)


def _definitions() -> dg.Definitions:
    from mmat_assets.assets import definitions_from_file

    return definitions_from_file(os.environ["MMAT_CONFIG"], "local")


@pytest.mark.slow  # the run's own process: loads the project and builds a shard
def test_ecs_launch_registers_task_runs_it_and_its_command_materializes_the_shard(
        aws: None, tmp_path: Path, tabmwp_dir: Path, metadata_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._core.test_utils import in_process_test_workspace
    from dagster._serdes import deserialize_value
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    ecs, ec2 = boto3.client("ecs"), boto3.client("ec2")
    daemon, subnet = _daemon_task(ecs, ec2)
    _Metadata.task = {"Cluster": daemon["clusterArn"], "TaskARN": daemon["taskArn"]}
    key_arn = boto3.client("secretsmanager").create_secret(Name="mmat/openai", SecretString=SECRET_VALUE)["ARN"]
    boto3.client("ssm").put_parameter(Name="/mmat/pg-password", Value=PG_PASSWORD, Type="SecureString")
    pg_arn = "arn:aws:ssm:us-east-1:123456789012:parameter/mmat/pg-password"
    config, home = _project(tmp_path, tabmwp_dir), _home(tmp_path)
    env = {"ECS_CONTAINER_METADATA_URI_V4": metadata_endpoint, "DAGSTER_HOME": str(home),
           "MMAT_CONFIG": str(config), "MMAT_PROFILE": "local", "MMAT_S3_BUCKET": "mmat-data",
           "MMAT_ECS_TASK_ROLE_ARN": "arn:aws:iam::123456789012:role/mmat-run",
           "MMAT_ECS_EXECUTION_ROLE_ARN": "arn:aws:iam::123456789012:role/mmat-run-execution",
           "MMAT_ECS_LOG_GROUP": "/mmat/runs", "MMAT_PG_PASSWORD_ARN": pg_arn, "MMAT_OPENAI_API_KEY_ARN": key_arn,
           "DAGSTER_PG_HOST": "db.internal", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_DB": "dagster",
           "DAGSTER_PG_USERNAME": "dagster"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    instance = dg.DagsterInstance.from_config(str(home))
    # the daemon asks the launcher about each running run's task: one whose task died is failed
    assert instance.run_monitoring_enabled and instance.run_launcher.supports_check_run_worker_health
    defs = _definitions()
    src = [dg.AssetKey(["source_samples", "tabmwp"]), dg.AssetKey(["quarantine", "source", "tabmwp"])]
    assert dg.materialize(list(defs.assets), selection=src, instance=instance, resources=defs.resources).success
    origin = LoadableTargetOrigin(python_file=str(REPO / "definitions.py"), working_directory=str(REPO),
                                  executable_path=sys.executable)
    sys.modules.pop("definitions", None)  # loaded afresh for this project, not one imported before
    with in_process_test_workspace(instance, origin, container_image=IMAGE) as workspace:
        run = _launch(instance, workspace, defs, "foundation_shards", "0")
        again = _launch(instance, workspace, defs, "foundation_shards", "1")
        training = _launch(instance, workspace, defs, "training", None)

    # a task definition per job of the code location's image: registered at the first run,
    # reused by the second run of the same job (one revision)
    families = ecs.list_task_definition_families(familyPrefix="mmat-run")["families"]
    assert len(families) == 2 and sum("foundation_shards" in f for f in families) == 1, families
    family = next(f for f in families if "foundation_shards" in f)
    arns = ecs.list_task_definitions(familyPrefix=family)["taskDefinitionArns"]
    assert len(arns) == 1, arns
    task_def = ecs.describe_task_definition(taskDefinition=arns[0])["taskDefinition"]
    (container,) = task_def["containerDefinitions"]
    assert container["name"] == "run" and container["image"] == IMAGE
    assert task_def["taskRoleArn"] == env["MMAT_ECS_TASK_ROLE_ARN"]
    assert task_def["executionRoleArn"] == env["MMAT_ECS_EXECUTION_ROLE_ARN"]
    assert sorted((s["name"], s["valueFrom"]) for s in container["secrets"]) == sorted(
        [("DAGSTER_PG_PASSWORD", pg_arn), ("OPENAI_API_KEY", key_arn)])
    environment = {e["name"]: e["value"] for e in container["environment"]}
    assert environment["MMAT_CONFIG"] == str(config) and environment["DAGSTER_PG_HOST"] == "db.internal"
    assert "DAGSTER_PG_PASSWORD" not in environment and "OPENAI_API_KEY" not in environment

    tasks = {r.run_id: ecs.describe_tasks(cluster="mmat", tasks=[instance.get_run_by_id(r.run_id).tags["ecs/task_arn"]])
             ["tasks"][0] for r in (run, again, training)}
    everything = json.dumps([task_def, list(tasks.values())], default=str)
    assert SECRET_VALUE not in everything and PG_PASSWORD not in everything  # by ARN, never values
    task = tasks[run.run_id]
    assert task["overrides"]["cpu"] == "2048" and task["overrides"]["memory"] == "8192"  # deployment.runs.foundation
    assert tasks[training.run_id]["overrides"]["memory"] == "32768"
    (override,) = task["overrides"]["containerOverrides"]
    gpu = tasks[training.run_id]["overrides"]["containerOverrides"][0]["resourceRequirements"]
    assert gpu == [{"type": "GPU", "value": "1"}]
    command = override["command"]
    assert command[:3] == ["dagster", "api", "execute_run"]
    args = deserialize_value(command[3])
    assert args.run_id == run.run_id and args.job_origin.job_name == "foundation_shards"
    assert args.job_origin.repository_origin.code_pointer.python_file.endswith("definitions.py")
    details = {d["name"]: d["value"] for a in task["attachments"] for d in a["details"]}
    assert details["subnetId"] == subnet and task["clusterArn"] == daemon["clusterArn"]  # the daemon's network

    # the container's entry point: that exact command, here, against the same instance
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ECS_")}
    run_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{run_env.get('PATH', '')}"
    proc = subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.SUCCESS
    record = instance.get_latest_materialization_event(dg.AssetKey("foundation_samples"))
    assert record is not None and record.run_id == run.run_id
    assert record.asset_materialization.partition == "0"
    assert (config.parent / "store" / "tables" / "foundation_samples" / "0.parquet").is_file()
    assert not (config.parent / "store" / "tables" / "foundation_samples" / "1.parquet").exists()  # not run here
