"""`LinearAttention` and `GatedLinearAttention` (GLA): projections, short convs, gates and norms around
one `linear_attention` call, with flash-linear-attention's layer interface so the layers can be swapped:

    forward(hidden_states [B, T, hidden], attention_mask=None, past_key_values=None, use_cache=False,
            cu_seqlens=None) -> (output [B, T, hidden], None, past_key_values)

`attention_mask` is a [B, T] padding mask (1 keep, 0 pad; when decoding with a cache it may cover past and
current tokens, and its last T columns are used): the kept tokens are packed into variable-length
sequences, run, and scattered back with zeros at the padded positions. `cu_seqlens` [N+1] (B == 1)
passes packed sequences directly. With `use_cache` the layer stores its states in `past_key_values`
(a `FastWeightCache`, created when None) under `layer_idx`, and starts from them on the next call.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers._checks import check_cu_seqlens
from ipl_layers.cache import FastWeightCache
from ipl_layers.layers.conv import ShortConvolution
from ipl_layers.layers.norm import GatedRMSNorm, RMSNorm
from ipl_layers.layers.padding import check_attention_mask, repad, unpad
from ipl_layers.ops import linear_attention

FEATURE_MAPS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "elu": lambda x: F.elu(x) + 1.0,  # elu + 1: positive, as in Katharopoulos et al. 2020
}


class _LinearAttentionLayer(nn.Module):
    """What both layers share: q/k/v projections, optional short convs, the op call with the cache and
    padding handling, the (gated) per-head output norm and o_proj. Subclasses add a feature map on q and
    k (`_feature_map`) or a log-decay (`_log_decay`)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        expand_k: float,
        expand_v: float,
        use_short_conv: bool,
        conv_size: int,
        use_output_norm: bool,
        use_output_gate: bool,
        norm_eps: float,
        layer_idx: Optional[int],
        backend: Optional[str],
    ):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.key_dim, self.value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        name = type(self).__name__
        dims = {"key_dim = hidden_size * expand_k": self.key_dim, "value_dim = hidden_size * expand_v": self.value_dim}
        for what, dim in dims.items():
            if dim < num_heads or dim % num_heads != 0:
                raise ValueError(f"{name}: {what} = {dim} must be a positive multiple of num_heads = {num_heads}")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.use_short_conv, self.conv_size = use_short_conv, conv_size
        self.use_output_norm, self.use_output_gate = use_output_norm, use_output_gate
        self.layer_idx, self.backend = layer_idx, backend

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, activation="silu", backend=backend)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, activation="silu", backend=backend)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, activation="silu", backend=backend)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_output_norm:
            norm = GatedRMSNorm if use_output_gate else RMSNorm
            self.o_norm = norm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def _feature_map(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def _log_decay(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def _run_op(self, q, k, v, x, initial_state, use_cache, cu_seqlens):
        """The op call on q, k [B, T, H, K], v [B, T, H, V] and the layer input x [B, T, hidden] (for gates):
        returns o [B, T, H, V] and the final state (None without use_cache). Layers around another op
        override it."""
        return linear_attention(
            q, k, v, self._log_decay(x), initial_state=initial_state, output_final_state=use_cache,
            cu_seqlens=cu_seqlens, update_state_in_place=initial_state is not None, backend=self.backend,
        )

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, V] -> the o_proj input [B, T, H * V]: the (gated) per-head norm, or the swish gate alone."""
        if self.use_output_gate:
            gate = self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v_dim))  # [B, T, H, V]
            o = self.o_norm(o, gate) if self.use_output_norm else o * F.silu(gate)
        elif self.use_output_norm:
            o = self.o_norm(o)
        return o.flatten(-2)

    def _check_inputs(self, hidden_states, cu_seqlens, past_key_values, use_cache):
        name = type(self).__name__
        if not isinstance(hidden_states, torch.Tensor):
            got = type(hidden_states).__name__
            raise TypeError(f"{name}: hidden_states: expected a tensor [B, T, hidden_size], got {got}")
        if hidden_states.dim() != 3:
            raise ValueError(f"{name}: hidden_states: expected 3-D [B, T, hidden_size], got {hidden_states.dim()}-D")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"{name}: hidden_states: expected last dim hidden_size = {self.hidden_size}, "
                f"got shape {list(hidden_states.shape)}"
            )
        B, T, _ = hidden_states.shape
        check_cu_seqlens(cu_seqlens, B, T, hidden_states.device, like_name="hidden_states")
        if (use_cache or past_key_values is not None) and self.layer_idx is None:
            raise ValueError(f"{name}: a cache needs the layer's index: build the layer with layer_idx=...")
        if past_key_values is not None and not isinstance(past_key_values, FastWeightCache):
            got = type(past_key_values).__name__
            raise TypeError(f"{name}: past_key_values: expected a FastWeightCache, got {got}")

    def _past_state(self, past_key_values, num_seqs: int) -> dict:
        """This layer's states in the cache ({} when none), checked against the number of sequences."""
        if past_key_values is None or len(past_key_values) <= self.layer_idx:
            return {}
        last = past_key_values[self.layer_idx]
        state = last.get("recurrent_state")
        rows = None if state is None else (state[0] if isinstance(state, tuple) else state).shape[0]
        if rows is not None and rows != num_seqs:
            raise ValueError(
                f"{type(self).__name__}: past_key_values[{self.layer_idx}] holds {rows} sequences, "
                f"the input has {num_seqs}"
            )
        return last

    def _begin(self, hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens):
        """The start every forward shares: input checks, the cache (created with use_cache), this layer's past
        states and a padding mask packed into cu_seqlens. Returns (x: [B, T, hidden] or packed [1, total,
        hidden], cu_seqlens, indices of the kept tokens (None when nothing was packed), past states, cache)."""
        self._check_inputs(hidden_states, cu_seqlens, past_key_values, use_cache)
        B, T, _ = hidden_states.shape
        if use_cache and past_key_values is None:
            past_key_values = FastWeightCache()
        last = self._past_state(past_key_values, B if cu_seqlens is None else cu_seqlens.numel() - 1)
        indices = None
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError(f"{type(self).__name__}: pass either attention_mask or cu_seqlens, not both")
            mask = check_attention_mask(attention_mask, B, T, has_past=last.get("seen_tokens", 0) > 0)
            if not mask.all():
                hidden_states, indices, cu_seqlens = unpad(hidden_states, mask)  # [1, total, hidden]
        return hidden_states, cu_seqlens, indices, last, past_key_values

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
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = None
        if self.use_short_conv:
            cq, ck, cv = last.get("conv_state", (None, None, None))
            # the cache's own states: a decoding step writes the next ones over them
            conv = dict(output_final_state=use_cache, cu_seqlens=cu_seqlens, update_state_in_place=cq is not None)
            q, cq = self.q_conv1d(q, cache=cq, **conv)
            k, ck = self.k_conv1d(k, cache=ck, **conv)
            v, cv = self.v_conv1d(v, cache=cv, **conv)
            conv_state = (cq, ck, cv) if use_cache else None
        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))  # [B, T, H, K]
        k = k.unflatten(-1, (self.num_heads, self.head_k_dim))  # [B, T, H, K]
        v = v.unflatten(-1, (self.num_heads, self.head_v_dim))  # [B, T, H, V]
        q, k = self._feature_map(q, k)
        o, recurrent_state = self._run_op(q, k, v, x, last.get("recurrent_state"), use_cache, cu_seqlens)
        if use_cache:
            past_key_values.update_states(self.layer_idx, offset=T, recurrent_state=recurrent_state,
                                          conv_state=conv_state)

        o = self.o_proj(self._output(o, x))  # [B, T, hidden]
        return (o if indices is None else repad(o, indices, B, T)), None, past_key_values


class LinearAttention(_LinearAttentionLayer):
    """Linear attention (no decay): o_t = scale * phi(q_t) sum_{s<=t} phi(k_s)^T v_s, per head.

    `feature_map` phi is applied elementwise to q and k after the optional short convs (+silu):
    "identity" (default), "relu" or "elu" (elu(x) + 1). The output goes through a per-head RMSNorm
    (`use_output_norm`), swish-gated by g_proj(x) with `use_output_gate`, then o_proj.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        feature_map: str = "identity",
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_output_norm: bool = True,
        use_output_gate: bool = False,
        norm_eps: float = 1e-5,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"LinearAttention: feature_map must be one of {tuple(FEATURE_MAPS)}, got {feature_map!r}")
        super().__init__(
            hidden_size, num_heads, expand_k, expand_v, use_short_conv, conv_size,
            use_output_norm, use_output_gate, norm_eps, layer_idx, backend,
        )
        self.feature_map = feature_map

    def _feature_map(self, q, k):
        phi = FEATURE_MAPS[self.feature_map]
        return phi(q), phi(k)


class GatedLinearAttention(_LinearAttentionLayer):
    """Gated linear attention (Yang et al. 2024): S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t per head, with the
    per-key log-decay gk = logsigmoid(W2 W1 x + b) / gate_logit_normalizer from a rank-`gate_low_rank_dim`
    projection, computed in fp32. The output goes through a per-head RMSNorm, swish-gated by g_proj(x) with
    `use_output_gate`, then o_proj.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16,
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_output_gate: bool = True,
        norm_eps: float = 1e-5,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(
            hidden_size, num_heads, expand_k, expand_v, use_short_conv, conv_size,
            True, use_output_gate, norm_eps, layer_idx, backend,
        )
        self.gate_logit_normalizer = gate_logit_normalizer
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
            nn.Linear(gate_low_rank_dim, self.key_dim, bias=True),
        )

    def _log_decay(self, x):
        gk = F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer  # [B, T, key_dim], <= 0
        return gk.unflatten(-1, (self.num_heads, self.head_k_dim))  # [B, T, H, K]
