"""`MemoryAttention`: sliding-window attention whose evicted tokens are learned in-parameter (the hybrid of AHN,
Infini-attention and Titans MAG): what is recent is attended exactly, what has left the window is written into
a fast-weight memory that the current query reads.

    q, k, v = W_q x, W_k x, W_v x                              [B, T, H * D], shared by both paths (as AHN)
    a_t = window_attention(q, k, v)_t                          keys t-W+1 .. t (`window_size` W, itself included)
    m_t = memory op at step t: writes token t-W (k, v and its gates beta = sigmoid(W_b x), g Mamba2-style for
          "gated_deltanet"), the token that has just left the window, then reads with q_t
    out = o_proj(a + sigmoid(gate_h) * m)                      gate [H], learned per head

So the memory at step t holds exactly tokens 0 .. t-W. It runs as the existing chunked ops over the key/value
sequence shifted by W tokens (a zero row with beta = 0 where no token has left yet: an exact no-op for the
delta rule and linear attention), so training has no per-token loop. With a cache the layer carries, per
sequence, the attention's last W-1 keys/values ("attn_state"), the memory state ("recurrent_state") and the
memory inputs of the last W tokens ("memory_queue" [N, W, C]: the tokens still to be written), so prefill
followed by token-by-token decoding equals one forward and the cache size is constant in the context length.

`window_size=0` leaves only the memory (every token written at its own step, as the bare op); a window longer
than the sequence leaves only attention (nothing is ever written). Memory q/k are L2-normalised (inside the op
for the delta rules).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers.cache import FastWeightCache
from ipl_layers.layers.delta_rule import mamba2_decay_parameters, mamba2_log_decay
from ipl_layers.layers.linear_attention import _LinearAttentionLayer
from ipl_layers.layers.padding import repad
from ipl_layers.layers.window_attention import window_attention_heads
from ipl_layers.ops import delta_rule, linear_attention
from ipl_layers.ops.chunking import pad_sequences

MEMORIES = ("gated_deltanet", "delta_rule", "linear_attention")


def shift_into_memory(x: torch.Tensor, queue: torch.Tensor, cu_seqlens: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The memory's inputs W tokens late: x [B, T, C] (or packed [1, total, C] with cu_seqlens) and each
    sequence's queue [N, W, C] of the W tokens before it -> (row t holds the input of token t - W, the queue
    after the last token of each sequence)."""
    W = queue.shape[1]
    if cu_seqlens is None:
        rows, back = x, (lambda y: y)
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    else:
        (rows,), back = pad_sequences([x], cu_seqlens, 1)  # [N, T_max, C], right-padded
        lengths = torch.diff(cu_seqlens.long())
    timeline = torch.cat([queue.to(rows.dtype), rows], 1)  # [N, W + T, C]: timeline index i is token i - W
    last = lengths[:, None] + torch.arange(W, device=x.device)  # [N, W]: the last W tokens of each sequence
    rest = timeline.gather(1, last[..., None].expand(-1, -1, timeline.shape[-1]))
    return back(timeline[:, : rows.shape[1]]), rest


class MemoryAttention(_LinearAttentionLayer):
    """Sliding-window attention plus a fast-weight memory of the tokens that left the window; see the module
    docstring.

    Args:
        hidden_size, num_heads: width and heads (head dim hidden_size / num_heads for attention and memory).
        window_size: W >= 0 tokens attended (itself included); 0 leaves only the memory.
        memory: "gated_deltanet" (default), "delta_rule" or "linear_attention".
        gate_init: the initial gate logit per head (sigmoid(-2) = 0.12: start close to the attention alone).
        dt_min, dt_max: the Mamba2-style decay's initial step sizes ("gated_deltanet").
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        window_size: int = 512,
        memory: str = "gated_deltanet",
        gate_init: float = -2.0,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(hidden_size, num_heads, 1.0, 1.0, False, 4, False, False, 1e-5, layer_idx, backend)
        if not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"MemoryAttention: window_size: expected an int >= 0, got {window_size!r}")
        if memory not in MEMORIES:
            raise ValueError(f"MemoryAttention: memory: expected one of {MEMORIES}, got {memory!r}")
        self.window_size, self.memory = window_size, memory
        self.gate = nn.Parameter(torch.full((num_heads,), float(gate_init)))  # [H] logits
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False) if memory != "linear_attention" else None
        if memory == "gated_deltanet":
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
            self.A_log, self.dt_bias = mamba2_decay_parameters(num_heads, dt_min, dt_max, "MemoryAttention")

    def _memory_inputs(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What writing a token needs, one row per token [B, T, C]: k, v [H * D] and the gates [H] (beta, g)."""
        parts = [k, v]
        if self.b_proj is not None:
            parts.append(torch.sigmoid(self.b_proj(x)))  # [B, T, H] learning rates
        if self.memory == "gated_deltanet":
            parts.append(mamba2_log_decay(self.a_proj(x), self.A_log, self.dt_bias))  # [B, T, H] <= 0
        dtype = torch.promote_types(k.dtype, torch.float32) if self.memory == "gated_deltanet" else k.dtype
        return torch.cat([p.to(dtype) for p in parts], -1)

    def _read_memory(self, q, written, initial_state, use_cache, cu_seqlens):
        """The memory op on the queries [B, T, H * D] and the shifted writes [B, T, C]: o [B, T, H, D], state."""
        H, D = self.num_heads, self.head_k_dim
        k, v = (y.unflatten(-1, (H, D)).to(q.dtype) for y in written[..., : 2 * H * D].split(H * D, -1))
        q = q.unflatten(-1, (H, D))  # [B, T, H, D]
        kw = dict(initial_state=initial_state, output_final_state=use_cache, cu_seqlens=cu_seqlens,
                  backend=self.backend)
        if self.memory == "linear_attention":  # unit q, k keep the sum of outer products bounded per token
            return linear_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, **kw)
        gates = written[..., 2 * H * D:]  # [B, T, H] beta, then [B, T, H] g
        g = gates[..., H:] if self.memory == "gated_deltanet" else None
        return delta_rule(q, k, v, gates[..., :H].to(q.dtype), g, use_qk_l2norm=True, **kw)

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
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H * D]
        attn_state = None
        if self.window_size > 0:
            a, attn_state = window_attention_heads(q, k, v, self.num_heads, self.window_size, cu_seqlens,
                                                   last.get("attn_state"), use_cache)
        else:
            a = torch.zeros_like(v)
        writes = self._memory_inputs(k, v, x)  # [B, T, C]
        queue = last.get("memory_queue")
        if queue is None:  # nothing has entered the window yet: zero rows write nothing (beta = 0, k = 0)
            queue = writes.new_zeros(N, self.window_size, writes.shape[-1])
        written, queue = shift_into_memory(writes, queue, cu_seqlens)
        m, state = self._read_memory(q, written, last.get("recurrent_state"), use_cache, cu_seqlens)
        if use_cache:
            past_key_values.update_states(self.layer_idx, offset=T, recurrent_state=state, attn_state=attn_state,
                                          memory_queue=queue)

        gate = torch.sigmoid(self.gate).to(m.dtype)[:, None]  # [H, 1]
        o = self.o_proj(a + (gate * m).flatten(-2))  # [B, T, hidden]
        return (o if indices is None else repad(o, indices, B, T)), None, past_key_values
