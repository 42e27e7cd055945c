"""`TitansMemory`: the long-term neural memory of Titans (Behrouz et al. 2025) as a sequence-mixing layer (the
memory-as-a-layer variant) around one `titans_memory` call, with the interface of the linear-attention
layers (forward signature, padding mask, cu_seqlens, cache; see `linear_attention.py`):

    q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))    [B, T, H, K]; q, k L2-normalised per head
    eta = sigmoid(W_eta x)                    [B, T, H] momentum
    theta = base_lr * sigmoid(W_theta x) * (1 - eta) / C    [B, T, H] step sizes (C = chunk_size)
    alpha = sigmoid(W_alpha x)                [B, T, H] forgetting (bias starts at -5: alpha ~ 0.007)
    o = titans_memory(q, k, v, theta, eta, alpha, initial_state=(W_1..W_L), normalize_step=True)
                                              W_l [H, d_in, d_out] learnable
    out = o_proj(RMSNorm(o))                  per head; RMSNorm(o) * silu(W_g x) with use_output_gate

Three factors keep the memory from diverging however training moves its gates and weights (each was needed:
README, Titans stability):
- / C: the chunked form takes all C gradients of a chunk at its start weights, so on similar keys their steps
  add up C-fold (per-token steps of base_lr * sigmoid(.) gave NaN in the first forward of a 4-layer model);
- (1 - eta): the momentum then averages the gradients instead of adding up 1 / (1 - eta) of them, so a chunk
  moves the memory by at most base_lr * sigmoid(.) times its mean gradient whatever the momentum;
- normalize_step: each step is divided by 1 + the curvature of the token's loss along its error (`titans_memory`),
  so a step removes at most theta of the error however large the MLP's hidden activations grow. Without it a
  4-layer model of these layers at lr 3e-3 on the stdlib corpus went NaN at step 177.

The memory of each head is an MLP of depth L (default 2, hidden 4K) wrapped as x + MLP(x) by default; the LN
of the wrapper is an option (`use_ln`): with it the backward through long contexts grows (README). With a
cache the memory's start weights, momentum and weights (a `TitansState`) and the short-conv histories carry
over to the next call, so a prefill followed by token-by-token decoding equals one forward.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers.layers.linear_attention import _LinearAttentionLayer
from ipl_layers.ops import titans_memory
from ipl_layers.ops.titans_memory import layer_dims


class TitansMemory(_LinearAttentionLayer):
    """The Titans neural memory layer; see the module docstring."""

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 16,
        depth: int = 2,
        expand: int = 4,
        chunk_size: int = 64,
        base_lr: float = 1.0,
        use_ln: bool = False,
        use_residual: bool = True,
        normalize_step: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_output_gate: bool = False,
        norm_eps: float = 1e-5,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(
            hidden_size, num_heads, 1.0, 1.0, use_short_conv, conv_size, True, use_output_gate, norm_eps, layer_idx,
            backend,
        )
        name = type(self).__name__
        for arg, value in (("depth", depth), ("expand", expand), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg}: expected a positive int, got {value!r}")
        if not base_lr > 0:
            raise ValueError(f"{name}: base_lr: expected > 0, got {base_lr}")
        H, K = num_heads, self.head_k_dim
        self.depth, self.expand, self.chunk_size, self.base_lr = depth, expand, chunk_size, base_lr
        self.use_ln, self.use_residual, self.normalize_step = use_ln, use_residual, normalize_step
        self.gate_proj = nn.Linear(hidden_size, 3 * H)  # theta, eta, alpha per head
        nn.init.normal_(self.gate_proj.weight, std=0.02)
        with torch.no_grad():
            self.gate_proj.bias.copy_(torch.tensor([0.0, 0.0, -5.0]).repeat_interleave(H))
        # the memory's initial weights per head, scaled so that each layer keeps unit-scale activations
        self.memory_weights = nn.ParameterList(
            nn.Parameter(torch.randn(H, d_in, d_out) / d_in**0.5) for d_in, d_out in layer_dims(K, K, expand * K, depth)
        )
        if use_ln:  # the wrapper's LN, per head
            self.memory_norm_weight = nn.Parameter(torch.ones(H, K))
            self.memory_norm_bias = nn.Parameter(torch.zeros(H, K))

    def _feature_map(self, q, k):
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1)

    def _run_op(self, q, k, v, x, initial_state, use_cache, cu_seqlens):
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        cached = initial_state is not None  # the cache's own state: a decoding step writes the next one over it
        if initial_state is None:  # every sequence starts from the learnable initial memory (expanded, not copied)
            initial_state = tuple(w.expand(N, *w.shape) for w in self.memory_weights)
        H = self.num_heads
        gates = torch.sigmoid(self.gate_proj(x)).unflatten(-1, (3, H))  # [B, T, 3, H]
        theta, eta, alpha = (gates[:, :, i].to(q.dtype) for i in range(3))
        theta = self.base_lr / self.chunk_size * theta * (1 - eta)  # module docstring: each factor bounds a step
        return titans_memory(
            q, k, v, theta, eta, alpha, normalize_step=self.normalize_step,
            ln_weight=getattr(self, "memory_norm_weight", None), ln_bias=getattr(self, "memory_norm_bias", None),
            chunk_size=self.chunk_size, initial_state=initial_state, output_final_state=use_cache,
            cu_seqlens=cu_seqlens, use_ln=self.use_ln, use_residual=self.use_residual, update_state_in_place=cached,
            backend=self.backend,
        )
