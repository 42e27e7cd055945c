"""Triton kernels of the TTT family: `ttt_linear` forward, backward and fused decode step."""

from ipl_layers.kernels.ttt.linear_bwd import ttt_linear_bwd
from ipl_layers.kernels.ttt.linear_decode import ttt_linear_decode
from ipl_layers.kernels.ttt.linear_fwd import ttt_linear_fwd

__all__ = ["ttt_linear_fwd", "ttt_linear_bwd", "ttt_linear_decode"]
