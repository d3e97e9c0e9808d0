"""samstudy: SAM variants under label noise."""

__version__ = "0.1.0"
