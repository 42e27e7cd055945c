"""`DeltaNet` and `GatedDeltaNet`: projections, short convs, learning rates, decays and norms around one
`delta_rule` call, with the interface (forward signature, padding mask, cu_seqlens, cache) of the
linear-attention layers (see `linear_attention.py`) and flash-linear-attention's conventions:

    q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))     (silu alone without short convs)
    beta = sigmoid(W_b x)                                                   [B, T, H] learning rates
    g = -exp(A_log) * softplus(W_a x + dt_bias)                             [B, T, H] log-decay, GatedDeltaNet
    o = o_proj(norm(delta_rule(q, k, v, beta, g, use_qk_l2norm=True)))     per-head (gated) RMSNorm
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers.layers.linear_attention import _LinearAttentionLayer
from ipl_layers.ops import delta_rule


def mamba2_decay_parameters(num_heads: int, dt_min: float, dt_max: float, owner: str
                            ) -> Tuple[nn.Parameter, nn.Parameter]:
    """A_log, dt_bias [H] of a Mamba2-style log-decay: A = exp(A_log) uniform in [1, 16], softplus(dt_bias)
    log-uniform in [dt_min, dt_max], as in Mamba2; marked for no weight decay (fla's marker)."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"{owner}: expected 0 < dt_min <= dt_max, got dt_min = {dt_min}, dt_max = {dt_max}")
    A = torch.empty(num_heads).uniform_(1, 16)  # [H] decay rates
    log_dt = torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt)  # [H] step sizes
    A_log, dt_bias = nn.Parameter(torch.log(A)), nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    A_log._no_weight_decay = dt_bias._no_weight_decay = True
    return A_log, dt_bias


def mamba2_log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """g = -exp(A_log) softplus(a + dt_bias) [B, T, H] <= 0 from a = W_a x [B, T, H], in fp32 at least."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return -A_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype))


class _DeltaRuleLayer(_LinearAttentionLayer):
    """The linear-attention layer body with the delta rule as its op: adds b_proj for beta; subclasses add a
    log-decay (`_log_decay`)."""

    def __init__(self, hidden_size, num_heads, expand_k, expand_v, use_short_conv, conv_size, use_output_gate,
                 norm_eps, layer_idx, backend):
        super().__init__(
            hidden_size, num_heads, expand_k, expand_v, use_short_conv, conv_size,
            True, use_output_gate, norm_eps, layer_idx, backend,
        )
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)

    def _run_op(self, q, k, v, x, initial_state, use_cache, cu_seqlens):
        if not self.use_short_conv:  # the convs end in silu: keep the same activations without them
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        beta = torch.sigmoid(self.b_proj(x))  # [B, T, H] in (0, 1): with unit keys the state stays bounded
        return delta_rule(
            q, k, v, beta, self._log_decay(x), initial_state=initial_state, output_final_state=use_cache,
            cu_seqlens=cu_seqlens, use_qk_l2norm=True, update_state_in_place=initial_state is not None,
            backend=self.backend,
        )


class DeltaNet(_DeltaRuleLayer):
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024): per head, S_t = (I - beta_t k_t^T k_t) S_{t-1} +
    beta_t k_t^T v_t with L2-normalised q, k and o_t = q_t S_t / sqrt(K). The output goes through a per-head
    RMSNorm, swish-gated by g_proj(x) with `use_output_gate`, then o_proj.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_output_gate: bool = False,
        norm_eps: float = 1e-5,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(
            hidden_size, num_heads, expand_k, expand_v, use_short_conv, conv_size, use_output_gate,
            norm_eps, layer_idx, backend,
        )


class GatedDeltaNet(_DeltaRuleLayer):
    """Gated DeltaNet (Yang et al. 2025): DeltaNet with a per-head decay of the state before each update,
    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, where the Mamba2-style log-decay
    g = -exp(A_log) * softplus(a_proj(x) + dt_bias) is computed in fp32 (at least). A = exp(A_log) starts
    uniform in [1, 16] and softplus(dt_bias) log-uniform in [dt_min, dt_max], as in Mamba2. The output goes
    through a per-head RMSNorm, swish-gated by g_proj(x) with `use_output_gate` (the default), then o_proj.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 2.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_output_gate: bool = True,
        norm_eps: float = 1e-5,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(
            hidden_size, num_heads, expand_k, expand_v, use_short_conv, conv_size, use_output_gate,
            norm_eps, layer_idx, backend,
        )
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log, self.dt_bias = mamba2_decay_parameters(num_heads, dt_min, dt_max, type(self).__name__)

    def _log_decay(self, x):
        return mamba2_log_decay(self.a_proj(x), self.A_log, self.dt_bias)
