"""Dagster resources: where tables and media live, chosen by profile.

Secrets (S3 credentials) are never configuration values: botocore reads the standard AWS
variables, and the endpoint of an S3-compatible server comes through ``dg.EnvVar``.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field
from upath import UPath

from mmat_assets.io_managers import JsonIOManager, PolarsParquetIOManager
from mmat_assets.media import MediaStore


def _storage_options(endpoint_url: str | None) -> dict[str, Any]:
    return {"endpoint_url": endpoint_url} if endpoint_url else {}


class StorageResource(dg.ConfigurableResource):
    """The storage root of a profile: a local directory or an ``s3://bucket/prefix`` URL."""

    root: str = Field(description="Directory or s3:// URL under which media and tables live.")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, moto); None for AWS."
    )

    def path(self, *parts: str) -> UPath:
        """A path under the root (``storage.path("reports", "x.md")``)."""
        return UPath(self.root, **_storage_options(self.endpoint_url)).joinpath(*parts)

    def media(self) -> MediaStore:
        """The content-addressed media store under this root."""
        return MediaStore(self.root, _storage_options(self.endpoint_url))


class ParquetIOManager(dg.ConfigurableIOManagerFactory):
    """Polars Parquet tables under ``base_path`` (a directory or an ``s3://`` URL)."""

    base_path: str = Field(description="Directory or s3:// URL for asset tables.")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint.")

    def create_io_manager(self, context: dg.InitResourceContext) -> PolarsParquetIOManager:
        return PolarsParquetIOManager(
            base_path=UPath(self.base_path, **_storage_options(self.endpoint_url))
        )


class JsonIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """JSON documents under ``base_path`` (a directory or an ``s3://`` URL)."""

    base_path: str = Field(description="Directory or s3:// URL for JSON assets.")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint.")

    def create_io_manager(self, context: dg.InitResourceContext) -> JsonIOManager:
        return JsonIOManager(base_path=UPath(self.base_path, **_storage_options(self.endpoint_url)))


def profile_resources(root: str, endpoint_url: Any = None) -> dict[str, Any]:
    """The resources of one profile, given its storage root."""
    tables = str(UPath(root) / "tables") if "://" not in root else root.rstrip("/") + "/tables"
    return {
        "storage": StorageResource(root=root, endpoint_url=endpoint_url),
        "io_manager": ParquetIOManager(base_path=tables, endpoint_url=endpoint_url),
        "json_io_manager": JsonIOManagerFactory(base_path=tables, endpoint_url=endpoint_url),
    }
