"""recops: behaviour logs to an LLM-based recommender on Triton, shipped through A/B experiments."""

__version__ = "0.1.0"
