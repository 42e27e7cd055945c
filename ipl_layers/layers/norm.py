"""RMS norms over the last dim, computed in fp32 (at least) and returned in the dtype of the input.

`GatedRMSNorm` is the swish-gated output norm of GLA/RetNet-style layers: rmsnorm(x) * weight * silu(gate).
"""

import torch
import torch.nn.functional as F
from torch import nn


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, in fp32 (float64 stays float64)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    # mean(x^2) as ||x||^2 / D: vector_norm is one fused reduction where pow then mean are two passes (CPU, fp32,
    # [8, 2048, 4, 64], side by side on a loaded machine: forward 3.6 vs 7.4 ms, forward+backward 89 vs 100 ms)
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]  # [..., 1]
    return x * torch.rsqrt(mean_square + eps)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim `dim`."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm: expected last dim {self.dim}, got shape {list(x.shape)}")
        return (_rms_normalize(x, self.eps) * self.weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class GatedRMSNorm(RMSNorm):
    """y = x / rms(x) * weight * silu(gate) over the last dim `dim`; `gate` has the shape of `x`."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"GatedRMSNorm: expected last dim {self.dim}, got shape {list(x.shape)}")
        if gate.shape != x.shape:
            raise ValueError(f"GatedRMSNorm: gate shape {list(gate.shape)} differs from x shape {list(x.shape)}")
        y = _rms_normalize(x, self.eps) * self.weight
        return (y * F.silu(gate.to(y.dtype))).to(x.dtype)
