"""raafd: a Trio daemon that streams AI-agent output to real-time clients."""

__version__ = "0.1.0"

__all__ = ["__version__"]
