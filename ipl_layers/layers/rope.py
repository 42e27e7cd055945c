"""Rotary position embedding (RoPE), the rotate-half convention of Llama: shared by the attention of the hybrid
models and by `MemoryAttention`, so that both reproduce a Llama attention layer exactly."""

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (the rotate-half convention of Llama) of x [N, T, H, D] at positions [N, T], in fp32."""
    D = x.shape[-1]
    inv_freq = theta ** -(torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)  # [D/2]
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [N, T, D/2]
    cos, sin = (torch.cat([f(angles)] * 2, -1)[:, :, None] for f in (torch.cos, torch.sin))  # [N, T, 1, D]
    xf = x.float()
    rotated = torch.cat([-xf[..., D // 2 :], xf[..., : D // 2]], -1)
    return (xf * cos + rotated * sin).to(x.dtype)
