"""ipl-layers: kernels and layers for in-parameter learning (fast-weight, memory and linear-attention layers)."""

from ipl_layers import _source_layout

_source_layout.install()  # before anything imports ipl_layers.kernels or ipl_layers.models

from ipl_layers import ops  # noqa: E402,F401

__version__ = "0.1.0"

# Last: the models build on the layers, and importing them registers IPLConfig and its models with the Auto classes.
from ipl_layers import models  # noqa: E402,F401
