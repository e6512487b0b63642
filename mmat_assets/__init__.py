"""mmat: build multimodal agent-tuning data and tune VLMs on it, as Dagster assets."""

__version__ = "0.1.0"
