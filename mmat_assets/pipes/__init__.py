"""Out-of-process entry points run through Dagster Pipes (``python -m mmat_assets.pipes.<name>``).

Work that needs another interpreter, device or machine (training) runs here; it reports
logs and materialization metadata back to the asset that launched it.
"""
