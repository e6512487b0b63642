"""A base class for sources read from files, and the guard that keeps one bad record local.

Most datasets are a file (or a folder) plus a directory of images. :class:`PathSource`
resolves its ``path`` option against the config's folder (a source that lays its images out
itself, or carries them as bytes, needs no more); :class:`FileSource` adds ``image_root``;
:func:`guarded_records` turns parsed records into rows so that a record whose parsing
raises becomes a :class:`~mmat_assets.contracts.BadRow` naming it, and the rest are read.

A minimal JSONL source::

    class MyOptions(FileSourceOptions):
        split: str = "train"

    class MySource(FileSource[MyOptions]):
        name = "mine"
        license = "CC-BY-4.0"
        Options = MyOptions

        def read(self):
            return guarded_records(iter_jsonl_objects(self.file), self._row, line_id)

        def _row(self, n, obj):
            return SourceRow(str(n), obj["q"], obj["a"], [ImageInput(path=obj["image"])])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import BadRow, Source, SourceRow
from mmat_assets.toolkit.jsonl import guarded

_K = TypeVar("_K")
#: What building one record's rows may return: one row, or any number of them.
Built = SourceRow | BadRow | Iterable[SourceRow | BadRow]


class PathSourceOptions(BaseModel):
    """The options every :class:`PathSource` reads; subclasses add their own (and may
    redeclare ``path`` with a description naming their file or folder)."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="The file (or folder) to read, relative to the config's folder.")
    license: str | None = Field(
        default=None, description="Licence carried by every row; defaults to the source's own licence.",
    )


class FileSourceOptions(PathSourceOptions):
    """The options every :class:`FileSource` reads: a :class:`PathSource`'s and ``image_root``."""

    image_root: str | None = Field(
        default=None,
        description="Directory image paths are relative to; defaults to the file's directory.",
    )


PathOptionsT = TypeVar("PathOptionsT", bound=PathSourceOptions)
FileOptionsT = TypeVar("FileOptionsT", bound=FileSourceOptions)


class PathSource(Source[PathOptionsT]):
    """A source whose ``path`` option names its data: a file or a folder.

    Its options model subclasses :class:`PathSourceOptions`
    (``class MySource(PathSource[MyOptions])`` with ``Options = MyOptions``). Subclasses
    implement :meth:`read`, and :meth:`image_root` where rows name images by path.
    """

    Options: type[PathOptionsT] = PathSourceOptions  # type: ignore[assignment]  # subclasses narrow it

    @property
    def root(self) -> Path:
        """The configured ``path``, resolved against :attr:`base_dir`."""
        return self.resolve_path(self.options.path)


class FileSource(PathSource[FileOptionsT]):
    """A source whose ``path`` option names its data, with images under ``image_root``.

    Its options model subclasses :class:`FileSourceOptions`
    (``class MySource(FileSource[MyOptions])`` with ``Options = MyOptions``). Subclasses
    implement :meth:`read`.
    """

    Options: type[FileOptionsT] = FileSourceOptions  # type: ignore[assignment]  # subclasses narrow it

    @property
    def file(self) -> Path:
        """The configured ``path``, resolved against :attr:`base_dir` (:attr:`root` by its other name)."""
        return self.root

    def image_root(self) -> Path | None:
        """The configured ``image_root``; without one, the directory holding :attr:`file`."""
        configured = self.options.image_root
        return self.resolve_path(configured) if configured else self.file.parent


def guarded_records(records: Iterable[tuple[_K, Any] | BadRow], build: Callable[[_K, Any], Built],
                    row_id: Callable[[_K], str] = str) -> Iterator[SourceRow | BadRow]:
    """The rows built from each ``(key, record)``; BadRows among ``records`` pass through.

    ``build(key, record)`` returns one row or an iterable of rows. When it raises, that
    record becomes one BadRow with id ``row_id(key)`` and the exception as its reason.
    """
    for item in records:
        if isinstance(item, BadRow):
            yield item
            continue
        key, record = item
        result = guarded(row_id(key), record, lambda: _as_list(build(key, record)))
        yield from [result] if isinstance(result, BadRow) else result


def _as_list(built: Built) -> list[SourceRow | BadRow]:
    return [built] if isinstance(built, (SourceRow, BadRow)) else list(built)


__all__ = ["Built", "FileOptionsT", "FileSource", "FileSourceOptions", "PathOptionsT", "PathSource",
           "PathSourceOptions", "guarded_records"]
