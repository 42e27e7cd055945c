"""Chunked Triton kernels of `linear_attention`: the launchers the autograd Function calls.

Files: chunk_layout.py (where the chunks lie, block sizes), chunk_cumsum.py (log-decay cumsums and the
decay gradient), chunk_state.py (the inter-chunk state scans), chunk_intra.py (per-key decay sub-chunk
kernels), chunk_fwd.py (outputs), chunk_bwd.py (gradients), chunk_config.py (configs, compile cases).
"""

from ipl_layers.kernels.linear_attn.chunk_bwd import chunk_bwd
from ipl_layers.kernels.linear_attn.chunk_fwd import chunk_fwd

__all__ = ["chunk_fwd", "chunk_bwd"]
