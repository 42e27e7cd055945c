"""`ShortConvolution`: the short causal depthwise convolution before q/k/v, as a module around `short_conv`."""

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ipl_layers.ops import short_conv


class ShortConvolution(nn.Module):
    """Causal depthwise convolution of width `kernel_size` over [B, T, dim], with optional bias and silu.

    The weight is [dim, kernel_size] (tap w multiplies x_{t-(W-1)+w}); the carried state is the last
    kernel_size - 1 inputs of each sequence, [N, dim, kernel_size - 1].
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 4,
        bias: bool = False,
        activation: Optional[str] = "silu",
        backend: Optional[str] = None,
    ):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"ShortConvolution: kernel_size must be >= 1, got {kernel_size}")
        self.dim, self.kernel_size, self.activation, self.backend = dim, kernel_size, activation, backend
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv1d's default for a depthwise conv: fan_in = kernel_size, uniform in +-1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        cache: Optional[torch.Tensor] = None,
        output_final_state: bool = False,
        cu_seqlens: Optional[torch.Tensor] = None,
        update_state_in_place: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x [B, T, dim] (B == 1 with `cu_seqlens`); cache [N, dim, kernel_size - 1] or None;
        `update_state_in_place`: a decoding step may write the new state over `cache` (`short_conv`).

        Returns y [B, T, dim] and, with `output_final_state`, the new state [N, dim, kernel_size - 1].
        """
        return short_conv(
            x, self.weight, self.bias, activation=self.activation, initial_state=cache,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, update_state_in_place=update_state_in_place,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{self.dim}, kernel_size={self.kernel_size}, bias={self.bias is not None}, activation={self.activation}"
