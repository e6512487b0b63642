"""The prod profile puts tables and media on S3 (a local moto server on a free port)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import dagster as dg
import polars as pl
import pytest
import yaml

from mmat_assets.assets import build_definitions
from mmat_assets.config import load_config
from tests.moto_s3 import moto_s3
from tests.tabmwp_subset import copy_tabmwp


@pytest.fixture()
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with moto_s3("mmat-test") as url:
        monkeypatch.setenv("MMAT_S3_ENDPOINT_URL", url)
        yield url


def test_prod_profile_materializes_foundation_into_s3(s3_endpoint: str, tmp_path: Path, tabmwp_dir: Path) -> None:
    import json

    copy_tabmwp(tabmwp_dir, tmp_path / "tabmwp", 12)
    (tmp_path / "mmat.yaml").write_text(yaml.safe_dump({
        "sources": {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}},
        "foundation": {"shards": 2},
        "profiles": {"local": {"root": "local"},
                     "prod": {"root": "s3://mmat-test/run1", "endpoint_url_env": "MMAT_S3_ENDPOINT_URL"}},
    }))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    defs = build_definitions(load_config(tmp_path / "mmat.yaml"), "prod")
    instance = dg.DagsterInstance.ephemeral()
    assets = list(defs.assets) + list(defs.asset_checks)
    src = [dg.AssetKey(["source_samples", "tabmwp"]), dg.AssetKey(["quarantine", "source", "tabmwp"])]
    assert dg.materialize(assets, selection=src, instance=instance, resources=defs.resources).success
    total = 0
    for shard in ("0", "1"):
        r = dg.materialize(assets, selection=[dg.AssetKey("foundation_samples")], partition_key=shard,
                           instance=instance, resources=defs.resources)
        assert r.success and all(e.passed for e in r.get_asset_check_evaluations())
        body = s3.get_object(Bucket="mmat-test", Key=f"run1/tables/foundation_samples/{shard}.parquet")["Body"].read()
        df = pl.read_parquet(io.BytesIO(body))
        total += df.height
        for uri in df["images"].list.first().struct.field("uri"):
            assert uri.startswith("s3://mmat-test/run1/media/")
            key = uri.removeprefix("s3://mmat-test/")
            png = s3.get_object(Bucket="mmat-test", Key=key)["Body"].read()
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert total == 12
    assert not (tmp_path / "local").exists()  # nothing went to the local profile's directory
    # lineage reads the same S3 tables back (the endpoint from the profile's variable)
    from typer.testing import CliRunner

    from mmat_assets.cli import app

    sample = df.row(0, named=True)
    res = CliRunner().invoke(app, ["lineage", sample["sample_id"], "--profile", "prod", "--json",
                                   "--config", str(tmp_path / "mmat.yaml")])
    assert res.exit_code == 0, res.output
    trace = json.loads(res.output)
    assert trace["source"]["source_row_id"] == sample["source_row_id"] and trace["images"][0]["exists"] is True
    chain = {a["asset"]: a for a in trace["assets"]}
    recorded = instance.get_latest_data_version_record(dg.AssetKey("foundation_samples"), False, "1")
    assert chain["foundation_samples"]["data_version"] == recorded.asset_materialization.tags["dagster/data_version"]
    assert chain["source_samples/tabmwp"]["changed_since"] is False


def test_a_table_overwritten_while_it_is_read_loads_whole(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two builds at once write the same table; one reading it while the other's copy lands
    gets one whole version, not an error (S3 serves each ranged read of an object that
    changed in between as 'no longer exists')."""
    import s3fs
    from upath import UPath

    from mmat_assets.io_managers import PolarsParquetIOManager

    path = UPath("s3://mmat-test/run/tables/reflections/1.parquet", endpoint_url=s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    old, new = (pl.DataFrame({"row": list(range(20_000)), "text": [f"{tag} {i}" for i in range(20_000)]})
                for tag in ("first", "second"))

    def put(df: pl.DataFrame) -> None:
        buf = io.BytesIO()
        df.write_parquet(buf)
        s3.put_object(Bucket="mmat-test", Key="run/tables/reflections/1.parquet", Body=buf.getvalue())

    put(old)
    call = s3fs.S3FileSystem._call_s3
    landed: list[bool] = []

    async def overwritten_before_the_first_get(self: s3fs.S3FileSystem, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "get_object" and not landed:  # the other build's copy lands as this reader reads
            landed.append(True)
            put(new)
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", overwritten_before_the_first_get)
    context: Any = SimpleNamespace(dagster_type=SimpleNamespace(typing_type=pl.DataFrame))  # what it reads
    loaded = PolarsParquetIOManager(base_path=UPath("s3://mmat-test/run", endpoint_url=s3_endpoint)).load_from_path(
        context, path)
    assert landed and (loaded.equals(old) or loaded.equals(new))
