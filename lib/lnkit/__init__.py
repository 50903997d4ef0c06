"""lnkit: the Llama-Nemotron pipeline as a flat library, one paper idea per module."""

__version__ = "0.1.0"
