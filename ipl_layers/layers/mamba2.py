"""`Mamba2`: the Mamba-2 SSD layer (Dao & Gu 2024) as a scalar-decay linear attention, with the interface of the
linear-attention layers (forward signature, padding mask, cu_seqlens, cache; see `linear_attention.py`):

    C, B, x = silu(conv(W_C u)), silu(conv(W_B u)), silu(conv(W_x u))   [B, T, H, N], [B, T, H, N], [B, T, H, P]
    dt = softplus(W_dt u + dt_bias)                                      [B, T, H] step sizes
    h_t = exp(-exp(A_log) dt_t) h_{t-1} + dt_t B_t^T x_t                 [H, N, P] state per head
    y_t = C_t h_t + D x_t                                                one `linear_attention` call (scale 1)
    out = W_o RMSNorm(y * silu(W_z u))                                   gate, then norm, per head

The state recurrence is the selective SSM with a scalar A per head, i.e. linear attention with q = C, k = dt B,
v = x and the log-decay g = -exp(A_log) dt, so it runs on the same chunked op, kernels and cache (the state
[N, H, N_state, P] and the three short-conv histories) as the other layers; a prefill followed by token-by-token
decoding equals one forward. Departures from the reference implementation, kept for that uniformity: B and C
per head (n_groups = num_heads), separate bias-free depthwise convs for x, B and C (one conv over their
concatenation is the same depthwise map, plus a bias), and the gated norm per head rather than over the
whole inner width.
"""

import math
from fractions import Fraction
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers.layers.linear_attention import _LinearAttentionLayer
from ipl_layers.layers.norm import RMSNorm
from ipl_layers.ops import linear_attention


class Mamba2(_LinearAttentionLayer):
    """Mamba-2 with `num_heads` heads of head dim expand * hidden_size / num_heads and state size `state_size`;
    see the module docstring. A = exp(A_log) starts uniform in [1, 16] and softplus(dt_bias) log-uniform in
    [dt_min, dt_max], as in the reference implementation."""

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 32,
        state_size: int = 64,
        expand: int = 2,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        for name, value in (("num_heads", num_heads), ("state_size", state_size), ("expand", expand)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba2: {name}: expected a positive int, got {value!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2: expected 0 < dt_min <= dt_max, got dt_min = {dt_min}, dt_max = {dt_max}")
        # key_dim = hidden_size * expand_k must come out as num_heads * state_size exactly: a Fraction, not a float
        expand_k = Fraction(num_heads * state_size, hidden_size)
        super().__init__(hidden_size, num_heads, expand_k, expand, True, conv_size, False, True, norm_eps, layer_idx,
                         backend)  # the output gate g_proj (z); the norm comes here, after the gate (Mamba-2's order)
        self.state_size, self.expand = state_size, expand
        self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.dt_proj = nn.Linear(hidden_size, num_heads, bias=False)
        A = torch.empty(num_heads).uniform_(1, 16)  # [H] decay rates
        self.A_log = nn.Parameter(torch.log(A))
        log_dt = torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt)  # [H] step sizes
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.D = nn.Parameter(torch.ones(num_heads))  # the skip connection per head
        for p in (self.A_log, self.dt_bias, self.D):  # fla's marker: training recipes leave these out of weight decay
            p._no_weight_decay = True

    def _run_op(self, q, k, v, x, initial_state, use_cache, cu_seqlens):
        dtype = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(self.dt_proj(x).to(dtype) + self.dt_bias.to(dtype))  # [B, T, H] > 0
        g = -self.A_log.to(dtype).exp() * dt  # [B, T, H] <= 0
        o, state = linear_attention(
            q, k * dt[..., None].to(k.dtype), v, g, scale=1.0, initial_state=initial_state,
            output_final_state=use_cache, cu_seqlens=cu_seqlens, update_state_in_place=initial_state is not None,
            backend=self.backend,
        )
        return o + self.D.to(v.dtype)[:, None] * v, state  # [B, T, H, P]

    def _output(self, o, x):
        gate = self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v_dim))  # [B, T, H, P]
        return self.o_norm(o * F.silu(gate)).flatten(-2)
