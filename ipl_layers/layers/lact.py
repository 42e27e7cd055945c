"""`LaCT`: the Large-Chunk TTT layer of Zhang et al. 2025, sliding-window attention and a SwiGLU fast weight
reading the same projections, with the interface of the linear-attention layers (forward signature, padding
mask, cu_seqlens, cache; see `linear_attention.py`):

    q, k, v = W_q x, W_k x, W_v x                                        [B, T, hidden]
    a = window_attention(q, k, v)      causal, `window_size` tokens (itself included), `num_heads` heads
    q', k' = l2norm(silu(q * s_q + b_q)), l2norm(silu(k * s_k + b_k))   per LaCT head; s, b learnable per channel
    v' = silu(v)
    lr = softplus(W_lr x + b_lr + softplus^-1(base_lr))                  [B, T, H_l, 3]: for W0, W1, W2
    beta = sigmoid(W_m x + b_m)                                          [B, T, H_l] momentum gates
    f = lact(q', k', v', lr, momentum=beta, initial_state=(W0, W1, W2))  learnable start weights per head
    out = o_proj(a + RMSNorm(f))                                         the fast weight's output normed per head

as in the authors' `LaCTSWIGLULayer` (their default `qkv_silu`, mamba-style lr parameterisation, per-head
`ttt_norm`). Left out: RoPE on q/k (left to the model around the layer, as in the other layers), their
optional q/k RMSNorm before attention, the low-rank start weights and the learnable output scale.

With a cache the layer carries, per sequence, the fast-weight state (a `LaCTState`, including the open chunk's
buffered tokens) and the last window-1 keys and values of the attention ("attn_state": keys, values [N,
window-1, heads, head_dim] and the count of real ones [N]), so a prefill followed by token-by-token decoding
equals one forward, with padding masks and packed `cu_seqlens` alike.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers.cache import FastWeightCache
from ipl_layers.layers.linear_attention import _LinearAttentionLayer
from ipl_layers.layers.norm import RMSNorm
from ipl_layers.layers.padding import repad
from ipl_layers.layers.window_attention import window_attention_heads
from ipl_layers.ops import lact

L2_EPS = 1e-5  # x / (||x|| + eps), as in the authors' code


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class LaCT(_LinearAttentionLayer):
    """LaCT (Zhang et al. 2025, "Test-Time Training Done Right"): sliding-window attention plus a SwiGLU fast
    weight per LaCT head that learns once per chunk of `chunk_size` tokens; see the module docstring.

    `num_heads` splits the attention, `num_lact_heads` (default `num_heads`) the fast weights, each of head dim
    hidden_size / num_lact_heads and hidden width `expand` times that (the authors use 1). `window_size`
    defaults to `chunk_size`, as in the paper."""

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        num_lact_heads: Optional[int] = None,
        chunk_size: int = 2048,
        window_size: Optional[int] = None,
        expand: int = 1,
        use_momentum: bool = True,
        use_muon: bool = False,
        renorm: bool = True,
        base_lr: float = 1e-3,
        norm_eps: float = 1e-5,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(hidden_size, num_heads, 1.0, 1.0, False, 4, False, False, norm_eps, layer_idx, backend)
        num_lact_heads = num_heads if num_lact_heads is None else num_lact_heads
        window_size = chunk_size if window_size is None else window_size
        for name, value in (("num_lact_heads", num_lact_heads), ("chunk_size", chunk_size),
                            ("window_size", window_size), ("expand", expand)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LaCT: {name}: expected a positive int, got {value!r}")
        if hidden_size % num_lact_heads != 0:
            raise ValueError(f"LaCT: hidden_size = {hidden_size} must be a multiple of num_lact_heads = "
                             f"{num_lact_heads}")
        if not base_lr > 0:
            raise ValueError(f"LaCT: base_lr: expected > 0, got {base_lr}")
        self.num_lact_heads, self.chunk_size, self.window_size = num_lact_heads, chunk_size, window_size
        self.use_muon, self.renorm, self.base_lr = use_muon, renorm, base_lr
        Hl, D = num_lact_heads, hidden_size // num_lact_heads
        self.lact_head_dim, Fd = D, expand * D
        self.qk_scale = nn.Parameter(torch.ones(2, hidden_size))  # per-channel affine of q, k for the fast weight
        self.qk_offset = nn.Parameter(torch.zeros(2, hidden_size))
        self.lr_proj = nn.Linear(hidden_size, 3 * Hl)  # per head: the learning rates of W0, W1, W2
        self.momentum_proj = nn.Linear(hidden_size, Hl) if use_momentum else None
        self.W0 = nn.Parameter(torch.randn(Hl, D, Fd) / math.sqrt(D))  # the start weights, as the authors init
        self.W1 = nn.Parameter(torch.randn(Hl, Fd, D) / math.sqrt(Fd))
        self.W2 = nn.Parameter(torch.randn(Hl, D, Fd) / math.sqrt(D))
        self.ttt_norm = RMSNorm(D, eps=norm_eps)

    def _fast_inputs(self, q, k, v, x):
        """The fast weight's q', k', v' [B, T, H_l, D], lr [B, T, H_l, 3] and momentum gates [B, T, H_l] or None."""
        Hl, D = self.num_lact_heads, self.lact_head_dim
        q = F.silu(q * self.qk_scale[0] + self.qk_offset[0]).unflatten(-1, (Hl, D))  # [B, T, H_l, D]
        k = F.silu(k * self.qk_scale[1] + self.qk_offset[1]).unflatten(-1, (Hl, D))
        q, k = (y / (y.norm(dim=-1, keepdim=True) + L2_EPS) for y in (q, k))
        v = F.silu(v).unflatten(-1, (Hl, D))
        lr_dtype = torch.promote_types(x.dtype, torch.float32)
        lr = F.softplus(self.lr_proj(x).to(lr_dtype) + _inverse_softplus(self.base_lr)).unflatten(-1, (Hl, 3))
        momentum = None if self.momentum_proj is None else torch.sigmoid(self.momentum_proj(x))
        return q, k, v, lr, momentum

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[FastWeightCache] = None,
        use_cache: bool = False,
        **kwargs,
    ) -> Tuple[torch.Tensor, None, Optional[FastWeightCache]]:
        x, cu_seqlens, indices, last, past_key_values = self._begin(
            hidden_states, attention_mask, past_key_values, use_cache, kwargs.get("cu_seqlens"))
        B, T = hidden_states.shape[:2]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, hidden]
        a, attn_state = window_attention_heads(q, k, v, self.num_heads, self.window_size, cu_seqlens,
                                               last.get("attn_state"), use_cache)
        fq, fk, fv, lr, momentum = self._fast_inputs(q, k, v, x)
        initial_state = last.get("recurrent_state")
        if initial_state is None:  # every sequence starts from the learnable start weights
            initial_state = tuple(w.expand(N, *w.shape) for w in (self.W0, self.W1, self.W2))
        f, state = lact(fq, fk, fv, lr, chunk_size=self.chunk_size, initial_state=initial_state,
                        output_final_state=use_cache, cu_seqlens=cu_seqlens, momentum=momentum, use_muon=self.use_muon,
                        renorm=self.renorm, backend=self.backend)
        if use_cache:
            past_key_values.update_states(self.layer_idx, offset=T, recurrent_state=state, attn_state=attn_state)

        o = self.o_proj(a + self.ttt_norm(f).flatten(-2))  # [B, T, hidden]
        return (o if indices is None else repad(o, indices, B, T)), None, past_key_values
