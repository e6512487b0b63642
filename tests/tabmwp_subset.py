"""A small TabMWP folder cut from the fixture one, for tests that build a project on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_tabmwp(tabmwp_dir: Path, data: Path, count: int) -> None:
    """Write the first ``count`` problems of ``tabmwp_dir``, with their table images, to ``data``."""
    problems = dict(list(json.loads((tabmwp_dir / "problems.json").read_text()).items())[:count])
    (data / "tables").mkdir(parents=True)
    (data / "problems.json").write_text(json.dumps(problems))
    for pid in problems:
        shutil.copy(tabmwp_dir / "tables" / f"{pid}.png", data / "tables")
