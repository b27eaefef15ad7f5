"""dist_ft: fine-tune language models on one process or many, from one YAML recipe."""

__version__ = "0.1.0"
