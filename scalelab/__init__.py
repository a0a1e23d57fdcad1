"""scalelab: a small, readable LLM lab."""

__version__ = "0.1.0"
