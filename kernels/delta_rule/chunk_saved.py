"""What the chunked `delta_rule` forward hands to its backward: the contract between chunk_fwd and chunk_bwd.

Per chunk of BT tokens (math in `ipl_layers/ops/delta_rule_chunk.py`), with b the chunk-local inclusive cumsum
of the log-decay g and Gamma_ij = exp(b_i - b_j) for j <= i:

    A = (I + StrictTril(diag(beta) (K K^T * Gamma)))^-1,   w = A diag(beta) (K * exp(b)),   u = A diag(beta) V
    v_new = u - w S0,   S_end = exp(b_last) S0 + (K * exp(b_last - b))^T v_new
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ipl_layers.kernels.linear_attn.chunk_layout import ChunkLayout


@dataclass
class DeltaRuleChunkSaved:
    layout: ChunkLayout
    gc: Optional[torch.Tensor]  # [B, T, H] fp32 chunk-local inclusive cumsum of g (None without g)
    A: torch.Tensor  # [B, T, H, BT] fp32: row t of its chunk's inverse (columns past the chunk's end are 0)
    w: torch.Tensor  # [B, T, H, K] fp32
    u: torch.Tensor  # [B, T, H, V] fp32
    hs: torch.Tensor  # [NT, H, K, V] fp32: the state at each chunk slot's start
    v_new: torch.Tensor  # [B, T, H, V] fp32
