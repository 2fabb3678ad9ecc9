"""k25: an open Python implementation of the Kimi K2.5 system."""

__version__ = "0.1.0"
