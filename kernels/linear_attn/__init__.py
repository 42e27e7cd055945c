"""Triton kernels of `linear_attention`: chunked forward/backward and fused recurrent forward/backward."""

from ipl_layers.kernels.linear_attn.chunk import chunk_bwd, chunk_fwd
from ipl_layers.kernels.linear_attn.fused_recurrent import fused_recurrent_bwd, fused_recurrent_fwd

__all__ = ["chunk_fwd", "chunk_bwd", "fused_recurrent_fwd", "fused_recurrent_bwd"]
