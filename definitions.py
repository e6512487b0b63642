"""Composition root: the project config and profile pick the assets and resources.

``MMAT_CONFIG`` (default ``mmat.yaml`` beside this file) and ``MMAT_PROFILE`` (``local`` or
``prod``) are read here, when Dagster loads the code location, and nowhere else.
"""

import os
from pathlib import Path

from mmat_assets.assets import definitions_from_file

defs = definitions_from_file(
    os.environ.get("MMAT_CONFIG", str(Path(__file__).with_name("mmat.yaml"))),
    os.environ.get("MMAT_PROFILE", "local"),
)
