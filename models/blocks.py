"""The pieces of an IPL decoder: the SwiGLU feed-forward and the pre-norm residual block around one sequence mixer
and one feed-forward (SwiGLU or a memory layer)."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ipl_layers.cache import FastWeightCache
from ipl_layers.layers.norm import RMSNorm


class SwiGLU(nn.Module):
    """out = W_down (silu(W_gate x) * W_up x), the feed-forward of Llama-style blocks."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class IPLBlock(GradientCheckpointingLayer):
    """x + mixer(norm(x)), then + ffn(norm(.)). `GradientCheckpointingLayer` recomputes the block in the backward
    once `model.gradient_checkpointing_enable()` is called (it drops the cache then: training needs none)."""

    def __init__(self, mixer: nn.Module, ffn: nn.Module, hidden_size: int, norm_eps: float):
        super().__init__()
        self.mixer_norm = RMSNorm(hidden_size, eps=norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(hidden_size, eps=norm_eps)
        self.ffn = ffn

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[FastWeightCache] = None,
        use_cache: bool = False,
        **kwargs,
    ) -> Tuple[torch.Tensor, Optional[FastWeightCache]]:
        """hidden_states [B, T, hidden] -> ([B, T, hidden], the cache). `cache` is the name transformers uses (and
        clears under gradient checkpointing); the layers take it as `past_key_values`."""
        mixed, _, cache = self.mixer(self.mixer_norm(hidden_states), attention_mask=attention_mask,
                                     past_key_values=cache, use_cache=use_cache, **kwargs)
        hidden_states = hidden_states + mixed
        return hidden_states + self.ffn(self.ffn_norm(hidden_states)), cache
