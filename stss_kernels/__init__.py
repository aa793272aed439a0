"""Fused kernels for tempered spatio-temporal self-similarity (STSS) alignment losses."""

__version__ = "0.1.0"
