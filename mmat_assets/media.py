"""The content-addressed media store: images kept once, named by their sha256.

Layout under the storage root: ``media/<first two hex>/<sha256><ext>``. The same bytes are
written once whatever source or shard names them; a URI is the object's full path
(``/abs/dir/media/ab/ab12....png`` locally, ``s3://bucket/prefix/media/...`` on S3).

Any number of builds may put the same object at once: each writes its own temporary file
and links it into place (locally), or sends one conditional PUT (S3); the first to land
wins, the others find it there, and no reader ever sees a partial object.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from upath import UPath

from mmat_assets.engine.leases import atomic_write, create_exclusive


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class MediaStore:
    """Write-once blob store for images on a local directory or an fsspec URL."""

    def __init__(self, root: str | Path, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | Path | None = None) -> None:
        self.root = UPath(str(root), **(storage_options or {})) / "media"
        self.is_local = self.root.protocol in ("", "file", "local")
        self._cache_dir = Path(cache_dir) if cache_dir else None

    def _path(self, digest: str, ext: str) -> UPath:
        return self.root / digest[:2] / f"{digest}{ext}"

    def put(self, data: bytes, ext: str = "") -> tuple[str, str]:
        """Store ``data`` (once); return ``(sha256, uri)``."""
        digest = sha256_bytes(data)
        path = self._path(digest, ext)
        if not path.exists():
            create_exclusive(path, data)  # False: another writer stored the same bytes first
        return digest, self.uri(path)

    @staticmethod
    def uri(path: UPath) -> str:
        return path.path if path.protocol in ("", "file", "local") else str(path)

    def open_uri(self, uri: str) -> UPath:
        """A path object for a URI this store produced (local path or remote URL)."""
        if "://" not in uri:
            return UPath(uri)
        return UPath(uri, **self.root.storage_options)

    def exists(self, uri: str) -> bool:
        return self.open_uri(uri).exists()

    def read(self, uri: str) -> bytes:
        return self.open_uri(uri).read_bytes()

    def local_path(self, uri: str) -> Path:
        """A local file holding the object; remote objects are fetched into a cache once."""
        if "://" not in uri:
            return Path(uri)
        cache = self._cache_dir or Path(tempfile.gettempdir()) / "mmat-media-cache"
        name = uri.rsplit("/", 1)[-1]
        local = cache / name[:2] / name
        if not local.exists():
            atomic_write(local, self.read(uri))
        return local
