"""Pure logic per stage: no Dagster imports, testable alone."""
