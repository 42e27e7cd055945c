"""`TTTLinear` and `TTTMLP`: the TTT layers of Sun et al. 2024 around one `ttt_linear` / `ttt_mlp` call, with the interface of the
linear-attention layers (forward signature, padding mask, cu_seqlens, cache; see `linear_attention.py`):

    q, k, v = W_q x, W_k x, W_v x                   [B, T, H, K] (through silu short convs with use_short_conv)
    eta = base_lr / K * sigmoid(W_lr x + b_lr)       [B, T, H] per-token inner learning rates
    s_i = max(1 / i + offset_i, 0)                   [b] position scales, offset learnable (starts at 0)
    o = ttt_linear(q, k, v, eta, ln_weight, ln_bias, s, initial_state=(W0, b0))    W0 [H, K, K], b0 [H, K] learnable
    out = o_proj(gelu(W_g x) * LN(o))                post-norm over the hidden features; the GELU gate optional

The inner model of each head is f(x) = x + LN(x W + b), trained on the reconstruction of v - k from k by
mini-batch gradient descent as the layer reads (see `ipl_layers/ops/ttt_linear.py`). With a cache the fast
weights, with the open mini-batch's gradient sums, carry over to the next call (a `TTTLinearState`), so a
prefill followed by token-by-token decoding equals one forward. RoPE on q/k (used by the authors' code) is
left to the model around the layer. `TTTMLP` is the same layer with the two-layer MLP inner model
x + LN(gelu(x W1 + b1) W2 + b2) (learnable W1 [H, K, 4K], b1, W2 [H, 4K, K], b2).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers.layers.linear_attention import _LinearAttentionLayer
from ipl_layers.ops import ttt_linear, ttt_mlp


class TTTLinear(_LinearAttentionLayer):
    """TTT-Linear (Sun et al. 2024, "Learning to (Learn at Test Time)"): per head a linear inner model with
    LN and residual, learning from each mini-batch of `mini_batch_size` tokens; see the module docstring."""

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 16,
        mini_batch_size: int = 16,
        base_lr: float = 1.0,
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_output_gate: bool = True,
        norm_eps: float = 1e-6,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(
            hidden_size, num_heads, 1.0, 1.0, use_short_conv, conv_size, False, use_output_gate, norm_eps,
            layer_idx, backend,
        )
        if not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"{type(self).__name__}: mini_batch_size: expected a positive int, got {mini_batch_size!r}")
        if not base_lr > 0:
            raise ValueError(f"{type(self).__name__}: base_lr: expected > 0, got {base_lr}")
        H, K = num_heads, self.head_k_dim
        self.mini_batch_size, self.base_lr = mini_batch_size, base_lr
        self.lr_proj = nn.Linear(hidden_size, H)  # per-head inner learning-rate gate
        nn.init.normal_(self.lr_proj.weight, std=0.02)
        nn.init.zeros_(self.lr_proj.bias)
        self.token_scale_offset = nn.Parameter(torch.zeros(mini_batch_size))  # learnable part of s_i = 1/i
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, K))  # the inner model's LN, per head
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, K))
        self._init_fast_weights(H, K)
        self.post_norm = nn.LayerNorm(self.value_dim, eps=norm_eps)

    def _init_fast_weights(self, H: int, K: int):
        self.W0 = nn.Parameter(torch.randn(H, K, K) * 0.02)  # the inner model's initial weights
        self.b0 = nn.Parameter(torch.zeros(H, K))

    def _start_state(self, N: int):
        """The learnable initial weights, one copy per sequence (expanded, not copied)."""
        H, K = self.num_heads, self.head_k_dim
        return self.W0.expand(N, H, K, K), self.b0.expand(N, H, K)

    def _ttt(self, *args, **kwargs):
        return ttt_linear(*args, **kwargs)

    def token_scale(self) -> torch.Tensor:
        """s_i = max(1 / i + offset_i, 0), i = 1..b: [b]."""
        i = torch.arange(1, self.mini_batch_size + 1, device=self.token_scale_offset.device)
        return (i.to(self.token_scale_offset.dtype).reciprocal() + self.token_scale_offset).clamp(min=0)

    def _run_op(self, q, k, v, x, initial_state, use_cache, cu_seqlens):
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        cached = initial_state is not None  # the cache's own state: a decoding step writes the next one over it
        if initial_state is None:  # every sequence starts from the learnable initial weights
            initial_state = self._start_state(N)
        eta = self.base_lr / self.head_k_dim * torch.sigmoid(self.lr_proj(x))  # [B, T, H]
        return self._ttt(
            q, k, v, eta.to(q.dtype), ln_weight=self.ttt_norm_weight, ln_bias=self.ttt_norm_bias,
            token_scale=self.token_scale(), mini_batch_size=self.mini_batch_size, initial_state=initial_state,
            output_final_state=use_cache, cu_seqlens=cu_seqlens, update_state_in_place=cached, backend=self.backend,
        )

    def _output(self, o, x):
        o = self.post_norm(o.flatten(-2))  # [B, T, H * K]
        if self.use_output_gate:
            o = F.gelu(self.g_proj(x), approximate="tanh") * o
        return o


class TTTMLP(TTTLinear):
    """TTT-MLP (Sun et al. 2024): TTTLinear with the inner model x + LN(gelu(x W1 + b1) W2 + b2), hidden width
    `expand * head_dim`, learnable W1, b1, W2, b2 (`ipl_layers/ops/ttt_mlp.py`); the state is a `TTTMLPState`."""

    def __init__(self, hidden_size: int = 1024, num_heads: int = 16, mini_batch_size: int = 16, expand: int = 4,
                 **kwargs):
        if not isinstance(expand, int) or expand < 1:
            raise ValueError(f"TTTMLP: expand: expected a positive int, got {expand!r}")
        self.expand = expand
        super().__init__(hidden_size, num_heads, mini_batch_size, **kwargs)

    def _init_fast_weights(self, H: int, K: int):
        Fd = self.expand * K
        self.W1 = nn.Parameter(torch.randn(H, K, Fd) * 0.02)  # normal(0, 0.02) as in the authors' code
        self.b1 = nn.Parameter(torch.zeros(H, Fd))
        self.W2 = nn.Parameter(torch.randn(H, Fd, K) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(H, K))

    def _start_state(self, N: int):
        return tuple(w.expand(N, *w.shape) for w in (self.W1, self.b1, self.W2, self.b2))

    def _ttt(self, *args, **kwargs):
        return ttt_mlp(*args, expand=self.expand, **kwargs)
