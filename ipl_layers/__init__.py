"""ipl-layers: kernels and layers for in-parameter learning (fast-weight, memory and linear-attention layers)."""

from ipl_layers import ops  # noqa: F401

__version__ = "0.1.0"
