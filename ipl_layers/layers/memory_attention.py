"""`MemoryAttention`: sliding-window attention whose evicted tokens are learned in-parameter (the hybrid of AHN,
Infini-attention and Titans MAG): what is recent is attended exactly, what has left the window is written into
a fast-weight memory that the current query reads.

    q, k, v = W_q x, W_k x, W_v x                              [B, T, H * D], shared by both paths (as AHN)
    a_t = window_attention(rope(q), rope(k), v)_t              keys t-W+1 .. t (`window_size` W, itself included)
    m_t = memory op at step t: writes token t-W (k, v and its write strength beta = sigmoid(W_b x) plus the
          memory's other gates), the token that has just left the window, then reads with q_t
    out = o_proj(a + sigmoid(gate_h) * m)                      gate [H], learned per head

Grouped key/value heads (`num_kv_heads` < num_heads: k, v [B, T, H_kv * D], each shared by H / H_kv query
heads, in attention and memory alike), `head_dim` and RoPE (`rope_theta`; positions count each sequence's tokens,
earlier calls included; None: no rotation) let the layer take over a Llama/Qwen attention layer's projections and
be that layer inside the window (`ipl_layers.models.retrofit`). The memory reads and writes the unrotated q, k: what
it recalls is content, not position. On CUDA with flash-attn, a call without cache and sinks runs the window
attention through flash-attn (`window_attention.flash_attention`).

With `adapter_rank` r > 0 the memory reads and writes q + B_q A_q x, k + B_k A_k x, v + B_v A_v x instead
(low-rank adapters, A [r, hidden], B [H * D, r] zero at the start, so the layer starts as without them): with
the gates, what a retrofit of a trained attention layer would train, the attention left as it is.

The memories, each per head on the same q, k, v:
- "gated_deltanet" / "delta_rule": the delta rule with learning rate beta (and for the first the Mamba2-style
  decay g = -exp(A_log) softplus(W_a x + dt_bias)); q, k L2-normalised inside the op.
- "linear_attention": the sum of outer products of the L2-normalised k and v (no gate).
- "ttt_linear": TTT-Linear's inner model LN(x W + b) (no residual: it recalls the value, not the query plus a
  correction) learning v from k by mini-batch GD with per-token learning rate eta = base_lr / D * beta;
  learnable start weights W0, b0 and LN gamma/beta.
- "titans": the Titans MLP memory (depth `memory_depth`, hidden 4 D, no residual) with momentum eta = sigmoid(.)
  and forgetting alpha = sigmoid(.) (one projection of x, bias 0 and -5 as in `TitansMemory`), step size
  theta = base_lr * beta * (1 - eta) / mini_batch_size and the op's `normalize_step`; learnable start weights.
  Each factor bounds a step as in `TitansMemory` (see there): without the 1 / C, per-token steps made the memory
  NaN in the first forward on the stdlib corpus (C = 16, 257 tokens); without (1 - eta) and the normalised
  step, a 4-layer model of these layers trained at lr 3e-3 went NaN at step 86.
For the last two q, k are L2-normalised in the layer, and `mini_batch_size` is the op's mini-batch / chunk.

So the memory at step t holds exactly tokens 0 .. t-W. It runs as the existing chunked ops over the key/value
sequence shifted by W tokens, so training has no per-token loop. Where no token has left the window yet the
shifted row is all zeros (k = v = 0 and every gate 0), and each op leaves its state exactly as it is on such a
row: the delta rules and linear attention add beta k^T (..) = 0 (decay exp(0) = 1); TTT-Linear adds
eta G = 0 to its gradient sums, so its weights stay the start weights (the row still counts as a position of
the mini-batch: mini-batches are counted from the sequence's first step, in the forward and in decoding alike);
Titans gets S_t = eta_t S_t-1 - theta_t grad = 0 and M_t = (1 - 0) M_t-1 + S_t = M_t-1. That Titans row is a
no-op only because its momentum S_t-1 is zero: the zero rows are the first steps of each sequence, before any
token is written, and a sequence starts with zero momentum (a fresh state, or a cached one that has itself seen
only zero rows). With a cache the layer carries, per sequence, the attention's last W-1 keys/values
("attn_state"), the memory state ("recurrent_state": a tensor, a `TTTLinearState` or a `TitansState`) and the
memory inputs of the last W tokens ("memory_queue" [N, W, C]: the tokens still to be written), so prefill
followed by token-by-token decoding equals one forward (mid-mini-batch and mid-chunk too) and the cache size is
constant in the context length.

Attention sinks (`num_sink_tokens` S, StreamingLLM): the first S tokens of each sequence stay keys of every later
query besides its window (`window_attention`), and the cache keeps them. They are not written into the memory
when they leave the window (the attention still sees them exactly): their memory rows are zero rows like those
above, so the first real write is token S at step S + W, after S + W no-op rows.

`window_size=0` leaves only the memory (every token written at its own step, as the bare op); a window longer
than the sequence leaves only attention (nothing is ever written).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers.cache import FastWeightCache
from ipl_layers.layers.delta_rule import mamba2_decay_parameters, mamba2_log_decay
from ipl_layers.layers.linear_attention import _LinearAttentionLayer
from ipl_layers.layers.padding import repad
from ipl_layers.layers.rope import apply_rope
from ipl_layers.layers.window_attention import flash_applies, flash_attention, window_attention_heads
from ipl_layers.ops import delta_rule, linear_attention, titans_memory, ttt_linear
from ipl_layers.ops.chunking import pad_sequences
from ipl_layers.ops.titans_memory import layer_dims

MEMORIES = ("gated_deltanet", "delta_rule", "linear_attention", "ttt_linear", "titans")
BASE_LR = {"ttt_linear": 1.0, "titans": 1.0}  # the defaults of the TTTLinear and TitansMemory layers


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


def sequence_positions(seen: torch.Tensor, total: int, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row's position in its sequence, earlier calls included: seen [N] tokens per sequence before this call
    -> [N, total] (or [1, total] for packed rows with cu_seqlens)."""
    rows = torch.arange(total, device=seen.device)
    if cu_seqlens is None:
        return seen[:, None] + rows
    starts, lengths = cu_seqlens[:-1].long(), torch.diff(cu_seqlens.long())
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=seen.device), lengths,
                                       output_size=total)  # [total]: the sequence of each row
    return (seen[sequence] + rows - starts[sequence])[None]


def low_rank_adapter(hidden_size: int, dim: int, rank: int) -> nn.Sequential:
    """x [.., hidden_size] -> B A x [.., dim] through rank `rank`; B starts at zero (so does its output), A as
    nn.Linear initialises it."""
    adapter = nn.Sequential(nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, dim, bias=False))
    nn.init.zeros_(adapter[1].weight)
    return adapter


class MemoryAttention(_LinearAttentionLayer):
    """Sliding-window attention plus a fast-weight memory of the tokens that left the window; see the module
    docstring.

    Args:
        hidden_size, num_heads: width and query heads.
        num_kv_heads: key/value heads (default num_heads), a divisor of num_heads.
        head_dim: per head (default hidden_size / num_heads), for attention and memory.
        rope_theta: RoPE base of the attention's q, k (None: no rotation).
        window_size: W >= 0 tokens attended (itself included); 0 leaves only the memory.
        memory: "gated_deltanet" (default), "delta_rule", "linear_attention", "ttt_linear" or "titans".
        gate_init: the initial gate logit per head (sigmoid(-2) = 0.12: start close to the attention alone).
        dt_min, dt_max: the Mamba2-style decay's initial step sizes ("gated_deltanet").
        mini_batch_size: tokens whose gradients share the start weights ("ttt_linear"'s mini-batch, "titans"'
            chunk).
        base_lr: scales the write strength into the learning rate ("ttt_linear": eta = base_lr / D * beta,
            default 1; "titans": theta = base_lr * beta * (1 - eta) / mini_batch_size, default 1).
        memory_depth: the Titans memory MLP's depth L ("titans"; 1 is a linear map).
        num_sink_tokens: S >= 0 attention sinks per sequence (needs window_size >= 1); never written into the
            memory.
        adapter_rank: r >= 0, the rank of the memory's q/k/v adapters (0: none).
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        window_size: int = 512,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        rope_theta: Optional[float] = None,
        memory: str = "gated_deltanet",
        gate_init: float = -2.0,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        mini_batch_size: int = 16,
        base_lr: Optional[float] = None,
        memory_depth: int = 2,
        num_sink_tokens: int = 0,
        adapter_rank: int = 0,
        layer_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"MemoryAttention: num_kv_heads: expected a positive divisor of num_heads = {num_heads}, "
                             f"got {num_kv_heads!r}")
        if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
            raise ValueError(f"MemoryAttention: head_dim: expected a positive int or None, got {head_dim!r}")
        if rope_theta is not None and not rope_theta > 0:
            raise ValueError(f"MemoryAttention: rope_theta: expected > 0 or None, got {rope_theta!r}")
        expand = 1.0 if head_dim is None else head_dim * num_heads / hidden_size
        super().__init__(hidden_size, num_heads, expand, expand, False, 4, False, False, 1e-5, layer_idx, backend)
        if head_dim is not None and self.head_k_dim != head_dim:  # int(hidden_size * expand) rounded down
            raise ValueError(f"MemoryAttention: head_dim: {head_dim} * num_heads = {head_dim * num_heads} is not "
                             f"representable as hidden_size * expand; got a head dim of {self.head_k_dim}")
        if rope_theta is not None and self.head_k_dim % 2:
            raise ValueError(f"MemoryAttention: head_dim: expected an even dim with RoPE (it rotates pairs), got "
                             f"{self.head_k_dim}")
        self.num_kv_heads, self.rope_theta = num_kv_heads, rope_theta
        if num_kv_heads != num_heads:  # [hidden] -> [H_kv * D]: each key/value head serves H / H_kv query heads
            self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_k_dim, bias=False)
            self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_v_dim, bias=False)
        if not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"MemoryAttention: window_size: expected an int >= 0, got {window_size!r}")
        if memory not in MEMORIES:
            raise ValueError(f"MemoryAttention: memory: expected one of {MEMORIES}, got {memory!r}")
        if not isinstance(num_sink_tokens, int) or num_sink_tokens < 0:
            raise ValueError(f"MemoryAttention: num_sink_tokens: expected an int >= 0, got {num_sink_tokens!r}")
        if num_sink_tokens and window_size == 0:
            raise ValueError(f"MemoryAttention: num_sink_tokens: expected 0 with window_size = 0 (no attention to "
                             f"keep sinks for), got {num_sink_tokens}")
        if not isinstance(adapter_rank, int) or adapter_rank < 0:
            raise ValueError(f"MemoryAttention: adapter_rank: expected an int >= 0, got {adapter_rank!r}")
        for arg, value in (("mini_batch_size", mini_batch_size), ("memory_depth", memory_depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MemoryAttention: {arg}: expected a positive int, got {value!r}")
        if base_lr is not None and not base_lr > 0:
            raise ValueError(f"MemoryAttention: base_lr: expected > 0 (or None for the memory's default), "
                             f"got {base_lr}")
        H, D = num_heads, self.head_k_dim
        self.window_size, self.memory, self.mini_batch_size = window_size, memory, mini_batch_size
        self.num_sink_tokens, self.adapter_rank = num_sink_tokens, adapter_rank
        self.adapters = nn.ModuleList(low_rank_adapter(hidden_size, dim, adapter_rank)
                                      for dim in (self.key_dim, self.key_dim, self.value_dim)) if adapter_rank else None
        self.base_lr = BASE_LR.get(memory) if base_lr is None else float(base_lr)
        self.gate = nn.Parameter(torch.full((H,), float(gate_init)))  # [H] logits
        self.b_proj = nn.Linear(hidden_size, H, bias=False) if memory != "linear_attention" else None
        if memory == "gated_deltanet":
            self.a_proj = nn.Linear(hidden_size, H, bias=False)
            self.A_log, self.dt_bias = mamba2_decay_parameters(H, dt_min, dt_max, "MemoryAttention")
        if memory == "ttt_linear":  # the inner model's start weights and LN, per head, as in TTTLinear
            self.memory_W0 = nn.Parameter(torch.randn(H, D, D) * 0.02)
            self.memory_b0 = nn.Parameter(torch.zeros(H, D))
            self.memory_norm_weight = nn.Parameter(torch.ones(H, D))
            self.memory_norm_bias = nn.Parameter(torch.zeros(H, D))
        if memory == "titans":
            self.eta_alpha_proj = nn.Linear(hidden_size, 2 * H)  # momentum, forgetting
            nn.init.normal_(self.eta_alpha_proj.weight, std=0.02)
            with torch.no_grad():
                self.eta_alpha_proj.bias.copy_(torch.tensor([0.0, -5.0]).repeat_interleave(H))
            # start weights scaled so that each layer keeps unit-scale activations, as in TitansMemory
            dims = layer_dims(D, D, 4 * D, memory_depth)  # (d_in, d_out) per layer
            self.memory_weights = nn.ParameterList(nn.Parameter(torch.randn(H, i, o) / i**0.5) for i, o in dims)

    def _memory_inputs(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What writing a token needs, one row per token [B, T, C]: k, v [H * D] and the gates [H] each (beta,
        then g for "gated_deltanet", eta and alpha for "titans")."""
        parts = [k, v]
        if self.b_proj is not None:
            parts.append(torch.sigmoid(self.b_proj(x)))  # [B, T, H] write strengths
        if self.memory == "gated_deltanet":
            parts.append(mamba2_log_decay(self.a_proj(x), self.A_log, self.dt_bias))  # [B, T, H] <= 0
        if self.memory == "titans":
            parts.append(torch.sigmoid(self.eta_alpha_proj(x)))  # [B, T, 2 H] momentum, forgetting in (0, 1)
        dtype = torch.promote_types(k.dtype, torch.float32) if self.memory == "gated_deltanet" else k.dtype
        return torch.cat([p.to(dtype) for p in parts], -1)

    def _read_memory(self, q, written, initial_state, use_cache, cu_seqlens):
        """The memory op on the queries [B, T, H * D] and the shifted writes [B, T, C]: o [B, T, H, D], state."""
        H, D = self.num_heads, self.head_k_dim
        k, v = (y.unflatten(-1, (H, D)).to(q.dtype) for y in written[..., : 2 * H * D].split(H * D, -1))
        q = q.unflatten(-1, (H, D))  # [B, T, H, D]
        # the cache's own state (when given): a decoding step writes the next one over it
        kw = dict(initial_state=initial_state, output_final_state=use_cache, cu_seqlens=cu_seqlens,
                  update_state_in_place=initial_state is not None, backend=self.backend)
        gates = written[..., 2 * H * D:].unflatten(-1, (-1, H))  # [B, T, G, H]: beta, then g or eta, alpha
        if self.memory in ("gated_deltanet", "delta_rule"):
            g = gates[..., 1, :] if self.memory == "gated_deltanet" else None
            return delta_rule(q, k, v, gates[..., 0, :].to(q.dtype), g, use_qk_l2norm=True, **kw)
        # unit q, k keep each write and read bounded whatever the scale of the shared projections
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.memory == "linear_attention":
            return linear_attention(q, k, v, **kw)
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        beta = self.base_lr * gates[..., 0, :].to(q.dtype)  # [B, T, H]
        if self.memory == "ttt_linear":
            if initial_state is None:  # every sequence starts from the learnable weights (expanded, not copied)
                kw["initial_state"] = (self.memory_W0.expand(N, H, D, D), self.memory_b0.expand(N, H, D))
            return ttt_linear(q, k, v, beta / D, ln_weight=self.memory_norm_weight, ln_bias=self.memory_norm_bias,
                              mini_batch_size=self.mini_batch_size, use_residual=False, **kw)
        if initial_state is None:
            kw["initial_state"] = tuple(w.expand(N, *w.shape) for w in self.memory_weights)
        eta, alpha = (gates[..., i, :].to(q.dtype) for i in (1, 2))  # [B, T, H] each
        theta = beta * (1 - eta) / self.mini_batch_size  # bounds a chunk's move (module docstring)
        return titans_memory(q, k, v, theta, eta, alpha, chunk_size=self.mini_batch_size, use_residual=False,
                             normalize_step=True, **kw)

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
        H, D = self.num_heads, self.head_k_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H * D], k, v [B, T, H_kv * D]
        if self.num_kv_heads != H:  # each key/value head read by its H / H_kv query heads
            k, v = (y.unflatten(-1, (self.num_kv_heads, D)).repeat_interleave(H // self.num_kv_heads, -2).flatten(-2)
                    for y in (k, v))  # [B, T, H * D]
        attn_past, attn_state = last.get("attn_state"), None
        position = last.get("position", torch.zeros(N, dtype=torch.long, device=x.device))  # [N] tokens so far
        positions = sequence_positions(position, x.shape[1], cu_seqlens)  # [B, T] or [1, total]
        qa, ka = q, k
        if self.rope_theta is not None:  # the attention's q, k rotated at each token's position in its sequence
            qa, ka = (apply_rope(y.unflatten(-1, (H, D)), positions, self.rope_theta).flatten(-2) for y in (q, k))
        if self.window_size > 0 and not self.num_sink_tokens and flash_applies(q, use_cache or bool(last)):
            qa, ka, va = (y.unflatten(-1, (H, D)) for y in (qa, ka, v))  # [B, T, H, D] or [1, total, H, D]
            a = flash_attention(qa, ka, va, self.window_size, cu_seqlens).flatten(-2)
        elif self.window_size > 0:
            a, attn_state = window_attention_heads(qa, ka, v, H, self.window_size, cu_seqlens, attn_past, use_cache,
                                                   self.num_sink_tokens)
        else:
            a = torch.zeros_like(v)
        if self.adapters is not None:  # the memory's own q, k, v [B, T, H * D]
            q, k, v = (y + adapter(x) for y, adapter in zip((q, k, v), self.adapters))
        writes = self._memory_inputs(k, v, x)  # [B, T, C]
        if self.num_sink_tokens:  # the sinks' rows write nothing: the attention keeps them (module docstring)
            writes = writes.masked_fill((positions < self.num_sink_tokens)[..., None], 0.0)
        queue = last.get("memory_queue")
        if queue is None:  # nothing has left the window yet: zero rows write nothing (module docstring)
            queue = writes.new_zeros(N, self.window_size, writes.shape[-1])
        written, queue = shift_into_memory(writes, queue, cu_seqlens)
        m, state = self._read_memory(q, written, last.get("recurrent_state"), use_cache, cu_seqlens)
        if use_cache:
            lengths = torch.full((N,), T, device=x.device) if cu_seqlens is None else torch.diff(cu_seqlens.long())
            past_key_values.update_states(self.layer_idx, offset=T, recurrent_state=state, attn_state=attn_state,
                                          memory_queue=queue, position=position + lengths)

        gate = torch.sigmoid(self.gate).to(m.dtype)[:, None]  # [H, 1]
        o = self.o_proj(a + (gate * m).flatten(-2))  # [B, T, hidden]
        return (o if indices is None else repad(o, indices, B, T)), None, past_key_values
