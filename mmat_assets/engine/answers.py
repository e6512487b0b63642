"""Answer normalisation and comparison, from the plugin toolkit (:mod:`mmat_assets.toolkit.answers`).

The host's reflection checks and the built-in benchmarks must judge answers the same way,
so both use the one public implementation.
"""

from __future__ import annotations

from mmat_assets.toolkit.answers import NUMBER_IN_TEXT as NUMBER_IN_TEXT
from mmat_assets.toolkit.answers import conclusion_of as conclusion_of
from mmat_assets.toolkit.answers import contains_answer as contains_answer
from mmat_assets.toolkit.answers import letter_of as letter_of
from mmat_assets.toolkit.answers import normalise_text as normalise_text
from mmat_assets.toolkit.answers import numbers_in as numbers_in
from mmat_assets.toolkit.answers import plain_fractions as plain_fractions
from mmat_assets.toolkit.answers import rationale_lines as rationale_lines
from mmat_assets.toolkit.answers import same_answer as same_answer
from mmat_assets.toolkit.answers import to_number as to_number
