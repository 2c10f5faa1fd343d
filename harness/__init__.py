"""harness: an LLM pretraining harness (Hydra configs, step-based iterations, honest metrics)."""

__version__ = "0.1.0"
