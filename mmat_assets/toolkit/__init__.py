"""The public toolkit for plugin authors: helpers a built-in plugin uses, and so may yours.

A plugin imports only :mod:`mmat_assets.hookspecs`, :mod:`mmat_assets.contracts`,
:mod:`mmat_assets.records`, :mod:`mmat_assets.protocol` and this package; these names stay.

- :mod:`~mmat_assets.toolkit.images`: :func:`open_rgb` (any image as 8-bit RGB),
  :func:`file_sha256`.
- :mod:`~mmat_assets.toolkit.jsonl`: streaming JSONL and member-by-member JSON reading
  where one bad line or value becomes a :class:`~mmat_assets.contracts.BadRow`
  (:func:`iter_jsonl_objects`, :func:`iter_json_members`, :func:`guarded`, excerpts).
- :mod:`~mmat_assets.toolkit.sources`: :class:`PathSource`, a source read from a configured
  file or folder; :class:`FileSource`, one with an image root as well; and
  :func:`guarded_records`.
- :mod:`~mmat_assets.toolkit.export`: the :class:`Record` an exporter receives,
  :func:`copy_images`, :func:`write_jsonl`, :func:`relative_to`, :func:`licence_counts`, and
  :func:`write_formats` / :func:`write_indexed_formats` (one file per format, images copied once).
- :mod:`~mmat_assets.toolkit.answers`: answer normalisation and comparison
  (:func:`same_answer`, :func:`letter_of`, :func:`normalise_text`, :func:`to_number`,
  :func:`numbers_in`, :func:`plain_fractions`, :func:`rationale_lines`).
- :mod:`~mmat_assets.toolkit.batch`: :class:`BatchCollector`, a turn-synchronous Batch API
  queue for a teacher (with :class:`BatchLimits` and :class:`BatchStats`).
- :mod:`~mmat_assets.toolkit.ratelimit`: :class:`AdaptiveLimiter`, AIMD concurrency that
  follows a provider's 429s and rate-limit headers.
- :mod:`~mmat_assets.toolkit.cpu`: :func:`cpu_threads`, the threads a model may use in this
  process (a build's worker gets its share of the cores; ``THREADS_ENV`` names the variable).

Importing the package is cheap: image libraries load only when an image is opened.
"""

from __future__ import annotations

from mmat_assets.toolkit.answers import (letter_of, normalise_text, numbers_in, plain_fractions, rationale_lines,
                                         same_answer, to_number)
from mmat_assets.toolkit.batch import BatchCollector, BatchLimits, BatchStats
from mmat_assets.toolkit.cpu import THREADS_ENV, cpu_threads
from mmat_assets.toolkit.export import (IMAGE_TAG, Record, copy_images, licence_counts, relative_to, write_formats,
                                        write_indexed_formats, write_jsonl)
from mmat_assets.toolkit.images import file_sha256, open_rgb
from mmat_assets.toolkit.jsonl import (excerpt_of, guarded, guarded_rows, iter_json_members, iter_jsonl,
                                       iter_jsonl_objects, line_id, raw_excerpt)
from mmat_assets.toolkit.ratelimit import AdaptiveLimiter
from mmat_assets.toolkit.sources import FileSource, FileSourceOptions, PathSource, PathSourceOptions, guarded_records

__all__ = [
    "IMAGE_TAG",
    "THREADS_ENV",
    "AdaptiveLimiter",
    "BatchCollector",
    "BatchLimits",
    "BatchStats",
    "FileSource",
    "FileSourceOptions",
    "PathSource",
    "PathSourceOptions",
    "Record",
    "copy_images",
    "cpu_threads",
    "excerpt_of",
    "file_sha256",
    "guarded",
    "guarded_records",
    "guarded_rows",
    "iter_json_members",
    "iter_jsonl",
    "iter_jsonl_objects",
    "letter_of",
    "licence_counts",
    "line_id",
    "normalise_text",
    "numbers_in",
    "open_rgb",
    "plain_fractions",
    "rationale_lines",
    "raw_excerpt",
    "relative_to",
    "same_answer",
    "to_number",
    "write_formats",
    "write_indexed_formats",
    "write_jsonl",
]
