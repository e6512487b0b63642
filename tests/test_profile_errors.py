"""A misconfigured prod deployment, or a broken config, stops the code location with one line
naming what is wrong.

Each case loads ``definitions.py`` in a fresh interpreter, as Dagster's code server does, with
the instance configuration of ``infra/`` (or none) in its ``DAGSTER_HOME``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA_YAML = REPO / "infra" / "dagster.yaml"
PG_VARS = {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_USERNAME": "dagster",
           "DAGSTER_PG_PASSWORD": "secret"}


@pytest.fixture()
def s3_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _closed_port() -> int:
    """A port nothing listens on: bound once to find it free, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project(tmp: Path, bucket: str) -> Path:
    path = tmp / "mmat.yaml"
    path.write_text(yaml.safe_dump({
        "sources": {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}},
        "profiles": {"local": {"root": "local"},
                     "prod": {"root": f"s3://{bucket}/run1", "endpoint_url_env": "MMAT_S3_ENDPOINT_URL"}},
    }))
    return path


def _home(tmp: Path, instance_yaml: Path | None) -> Path:
    home = tmp / "home"
    home.mkdir()
    if instance_yaml is not None:
        shutil.copy(instance_yaml, home / "dagster.yaml")
    return home


def _load(config: Path, home: Path, extra: dict[str, str], s3_url: str) -> subprocess.CompletedProcess[str]:
    """Load the code location as Dagster does: import definitions.py with the profile chosen."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_PG_", "MMAT_", "AWS_"))}
    env.update({"MMAT_CONFIG": str(config), "MMAT_PROFILE": "prod", "DAGSTER_HOME": str(home),
                "MMAT_S3_ENDPOINT_URL": s3_url, "AWS_ENDPOINT_URL_S3": s3_url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", **extra})
    return subprocess.run([sys.executable, "-c", "import definitions"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_variable_is_named(tmp_path: Path, s3_url: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="mmat-prod")
    env = {**PG_VARS, "DAGSTER_PG_PORT": "5432"}
    del env["DAGSTER_PG_HOST"]
    proc = _load(_project(tmp_path, "mmat-prod"), _home(tmp_path, INFRA_YAML), env, s3_url)
    line = _one_line(proc)
    # MMAT_S3_BUCKET (compute logs) is unset too: both named, nothing else reported
    assert "DAGSTER_PG_HOST" in line and "MMAT_S3_BUCKET" in line and "not set" in line, line
    assert "DAGSTER_PG_DB" not in line


def test_postgres_down_is_named(tmp_path: Path, s3_url: str) -> None:
    port = _closed_port()
    env = {**PG_VARS, "DAGSTER_PG_PORT": str(port), "MMAT_S3_BUCKET": "mmat-prod"}
    line = _one_line(_load(_project(tmp_path, "mmat-prod"), _home(tmp_path, INFRA_YAML), env, s3_url))
    assert "PostgreSQL" in line and f"127.0.0.1:{port}" in line and "does not answer" in line, line


def test_missing_bucket_is_named(tmp_path: Path, s3_url: str) -> None:
    # no instance yaml: only the profile's storage root is checked; the moto server has no buckets
    line = _one_line(_load(_project(tmp_path, "mmat-nowhere"), _home(tmp_path, None), {}, s3_url))
    assert "'mmat-nowhere'" in line and "does not exist" in line and s3_url in line, line


def test_sound_profile_loads(tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the bucket there the same check passes and the definitions load (in this process)."""
    import boto3

    from mmat_assets.config import load_config
    from mmat_assets.deploy import check_deployment

    boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="mmat-prod")
    environ = {"DAGSTER_HOME": str(_home(tmp_path, None)), "MMAT_S3_ENDPOINT_URL": s3_url}
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    check_deployment(load_config(_project(tmp_path, "mmat-prod")), "prod", environ)


@pytest.mark.parametrize(("text", "named"), [
    ("sources:\n  tabmwp: {plugin: tabmwp, quota: lots, options: {path: tabmwp}}\n",
     ["sources.tabmwp.quota", "valid integer"]),
    ("sources: [\n", ["is not valid YAML"]),
    ("sources:\n  tabmwp: {plugin: no_such_source, options: {path: tabmwp}}\n",
     ["no source named 'no_such_source'"]),
], ids=["invalid-value", "bad-yaml", "unregistered-plugin"])
def test_a_broken_config_stops_the_load_with_the_line_mmat_build_gives(
        tmp_path: Path, s3_url: str, text: str, named: list[str]) -> None:
    """What the UI's code location and its code server show: one line naming the file and what is
    wrong in it, as `mmat build` prints (runner.read_config), never a pydantic traceback."""
    config = tmp_path / "mmat.yaml"
    config.write_text(text)
    proc = _load(config, _home(tmp_path, None), {"MMAT_PROFILE": "local"}, s3_url)
    line = _one_line(proc)
    assert line.startswith(f"mmat: {config}"), line
    assert all(n in line for n in named), line
