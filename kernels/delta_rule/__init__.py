"""Triton kernels of `delta_rule`: chunked (WY form) forward and backward, and fused recurrent kernels.

Chunked forward: chunk_solve.py (A = (I + M)^-1 per chunk), chunk_wu.py (w, u), chunk_state.py (the scan
over chunks: hs, v_new, final state), chunk_fwd.py (outputs and the `chunk_fwd` launcher). chunk_saved.py is
what the forward hands to the backward (chunk_bwd*.py). fused_recurrent.py: token-by-token kernels, for
decoding and short sequences.
"""

from ipl_layers.kernels.delta_rule.chunk_bwd import chunk_bwd
from ipl_layers.kernels.delta_rule.chunk_fwd import chunk_fwd
from ipl_layers.kernels.delta_rule.fused_recurrent import fused_recurrent_bwd, fused_recurrent_fwd

__all__ = ["chunk_fwd", "chunk_bwd", "fused_recurrent_fwd", "fused_recurrent_bwd"]
