"""Fused recurrent Triton kernels of `linear_attention`: token-by-token scans for short inputs and decoding.

One program per (sequence, head, V block) holds the state block S [K, BV] in fp32 registers and loops
over the sequence's tokens (math in `ipl_layers/ops/linear_attention.py`):

    S_t = D_t S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

The backward kernel runs two scans in one program: a forward re-scan of S_t for dq_t = scale * S_t dO_t,
and a reverse scan of dS_t = dL/dS_t,

    dS_t = D_{t+1} dS_{t+1} + scale * q_t^T dO_t,    dk_t = dS_t v_t^T,    dv_t = k_t dS_t,

ending with dh0 = D_1 dS_1. With log-decays G_t = g_1 + ... + g_t, the outputs and the final state
depend on g only through q_t e^{G_t}, k_s e^{-G_s} and e^{G_T}, which gives dg without S_{t-1}:

    dg_t = sum_{s >= t} (q_s * dq_s - k_s * dk_s) + sum_v (S_T * dS_T)[:, v]     (dS_T = dht)

summed over the key channels too for a scalar decay. Expanded into pairs (i, j) of a query i (or the
final state) and a key j <= i (or h0), dg_t keeps the pairs with j < t <= i; a pair with both ends >= t
enters once through q_i * dq_i and once, negated, through k_j * dk_j. The pairs (i, i) and (final state,
token T) always cancel so, and under strong decay they are the only large ones (the others carry
e^{G_i - G_j} << 1): summed in fp32 they would bury the true dg in rounding noise. So dg sums

    x_s = q_s * dq'_s - k_s * dk'_s,    dq'_s = scale * (D_s S_{s-1}) dO_s,    dk'_s = (D_{s+1} dS_{s+1}) v_s

(dk'_T = 0: its dht v_T is the (final state, T) pair) on top of sum_v (D_T S_{T-1} * dht), the final
state recomputed without token T's k^T v rather than subtracted. dq_s = dq'_s + scale * (v_s . dO_s) k_s,
and dk_s comes from dS_s as above.

When the V dimension is split into blocks, dq, dk and dg are partial sums over V blocks: each program
writes its own fp32 partials and the host sums them.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.common.registry import CompileCase, register

# Forms of the log-decay g; the kernels take their values as the constexpr GATE.
GATE_NONE, GATE_SCALAR, GATE_KEY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# Largest state block one program holds in registers (fp32 elements), which fixes BV for a given K.
STATE_BLOCK_ELEMENTS = 4096
# Beyond this K even BV = 16 would not fit S and dS in registers.
MAX_K = 256

# Loops without tl.dot are not software-pipelined, so one stage. Few warps suit decoding (T = 1); the
# backward holds S and dS: at K = V = 64, 8 warps keep it at 80 registers a thread (4 warps: 128).
FWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 1, 2, 8)]
BWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (8, 4)]


@triton.jit
def _sequence_span(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """First and one-past-last token of sequence i_n in the flattened [B * T] token axis."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def _decay(S, g, tok, i_h, o_k, m_k, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr):
    """D_t S for the state block S [BK, BV] (GATE != GATE_NONE)."""
    if GATE == GATE_SCALAR:
        S = S * tl.exp(tl.load(g + tok * H + i_h).to(tl.float32))
    else:
        g_t = tl.load(g + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)  # [BK]
        S = S * tl.exp(g_t)[:, None]
    return S


@autotune(FWD_CONFIGS, key=["BK", "BV", "GATE"])
@triton.jit
def linear_attn_fused_recurrent_fwd_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    g,  # [B, T, H] or [B, T, H, K] or None
    h0,  # [N, H, K, V] or None
    o,  # [B, T, H, V]
    ht,  # [N, H, K, V] fp32 or None
    cu_seqlens,  # [N + 1] or None
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # Scalar int64 bases plus int32 tile offsets: a [BK, BV] int64 offset tensor live across the loop
    # would cost two registers per state element.
    p_state = i_nh.to(tl.int64) * K * V  # this head's state in [N, H, K, V]
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + p_state + o_kv, mask=m_kv, other=0).to(tl.float32)
    for tok in range(bos, eos):
        p_k = (tok * H + i_h) * K  # token tok, head i_h in [B, T, H, K]
        p_v = (tok * H + i_h) * V  # token tok, head i_h in [B, T, H, V]
        k_t = tl.load(k + p_k + o_k, mask=m_k, other=0).to(tl.float32)
        v_t = tl.load(v + p_v + o_v, mask=m_v, other=0).to(tl.float32)
        q_t = tl.load(q + p_k + o_k, mask=m_k, other=0).to(tl.float32)
        if GATE != GATE_NONE:
            S = _decay(S, g, tok, i_h, o_k, m_k, H, K, GATE)
        S += k_t[:, None] * v_t[None, :]
        o_t = tl.sum(S * q_t[:, None], axis=0) * scale  # [BV]
        tl.store(o + p_v + o_v, o_t.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        tl.store(ht + p_state + o_kv, S, mask=m_kv)


@autotune(BWD_CONFIGS, key=["BK", "BV", "GATE"])
@triton.jit
def linear_attn_fused_recurrent_bwd_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    g,  # [B, T, H] or [B, T, H, K] or None
    h0,  # [N, H, K, V] or None
    do,  # [B, T, H, V]
    dht,  # [N, H, K, V] or None
    dq,  # [NV, B, T, H, K] fp32 partials over V blocks
    dk,  # [NV, B, T, H, K] fp32 partials over V blocks
    dv,  # [B, T, H, V]
    dg,  # [NV, B, T, H] or [NV, B, T, H, K] fp32 partials over V blocks (first q * dq'), or None
    dh0,  # [N, H, K, V] or None
    cu_seqlens,  # [N + 1] or None
    scale,
    T,
    n_tokens,  # B * T: the stride between V-block partials is n_tokens * H * K (or n_tokens * H)
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    USE_H0: tl.constexpr,
    USE_DHT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # Scalar int64 bases plus int32 tile offsets: a [BK, BV] int64 offset tensor live across the loop
    # would cost two registers per state element.
    p_state = i_nh.to(tl.int64) * K * V  # this head's state in [N, H, K, V]
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    dq += i_v.to(tl.int64) * n_tokens * H * K
    dk += i_v.to(tl.int64) * n_tokens * H * K
    if GATE == GATE_SCALAR:
        dg += i_v.to(tl.int64) * n_tokens * H
    if GATE == GATE_KEY:
        dg += i_v.to(tl.int64) * n_tokens * H * K

    # Forward re-scan for dq_t = scale * S_t dO_t. With a decay it goes through dq'_t (module docstring),
    # whose q_t * dq'_t, the query part of x_t, waits in dg for the reverse scan; the last token's k^T v
    # is left out of S, so S ends as D_T S_{T-1} for the final-state term of dg.
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + p_state + o_kv, mask=m_kv, other=0).to(tl.float32)
    for tok in range(bos, eos):
        p_k = (tok * H + i_h) * K  # token tok, head i_h in [B, T, H, K]
        p_v = (tok * H + i_h) * V  # token tok, head i_h in [B, T, H, V]
        k_t = tl.load(k + p_k + o_k, mask=m_k, other=0).to(tl.float32)
        v_t = tl.load(v + p_v + o_v, mask=m_v, other=0).to(tl.float32)
        do_t = tl.load(do + p_v + o_v, mask=m_v, other=0).to(tl.float32)
        if GATE == GATE_NONE:
            S += k_t[:, None] * v_t[None, :]
            dq_t = tl.sum(S * do_t[None, :], axis=1) * scale
        else:
            q_t = tl.load(q + p_k + o_k, mask=m_k, other=0).to(tl.float32)
            S = _decay(S, g, tok, i_h, o_k, m_k, H, K, GATE)
            dq_t = tl.sum(S * do_t[None, :], axis=1) * scale  # dq'_t [BK]
            if GATE == GATE_SCALAR:
                tl.store(dg + tok * H + i_h, tl.sum(q_t * dq_t, axis=0))
            else:
                tl.store(dg + p_k + o_k, q_t * dq_t, mask=m_k)
            S += tl.where(tok + 1 < eos, k_t, 0)[:, None] * v_t[None, :]
            dq_t += scale * tl.sum(v_t * do_t, axis=0) * k_t
        tl.store(dq + p_k + o_k, dq_t, mask=m_k)

    # Reverse scan from dS_T = dht.
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + p_state + o_kv, mask=m_kv, other=0).to(tl.float32)
    if GATE != GATE_NONE:
        # running sum_{s >= t} x_s, from sum_v (D_T S_{T-1} * dht): [BK], or a scalar for a scalar decay
        dg_acc = tl.sum(S * dS, axis=1)
        if GATE == GATE_SCALAR:
            dg_acc = tl.sum(dg_acc, axis=0)
        # the reverse scan reads back the q_t * dq'_t stored above: make them visible to all the threads
        tl.debug_barrier()
    for i in range(0, eos - bos):
        tok = eos - 1 - i
        p_k = (tok * H + i_h) * K  # token tok, head i_h in [B, T, H, K]
        p_v = (tok * H + i_h) * V  # token tok, head i_h in [B, T, H, V]
        q_t = tl.load(q + p_k + o_k, mask=m_k, other=0).to(tl.float32)
        k_t = tl.load(k + p_k + o_k, mask=m_k, other=0).to(tl.float32)
        v_t = tl.load(v + p_v + o_v, mask=m_v, other=0).to(tl.float32)
        do_t = tl.load(do + p_v + o_v, mask=m_v, other=0).to(tl.float32)
        if GATE != GATE_NONE:
            # x_t = q_t * dq'_t - k_t * dk'_t. q_t * dq'_t is loaded before the reduction below, which every
            # thread holding a copy of it passes before any of them stores dg_t over it.
            if GATE == GATE_SCALAR:
                qdq_t = tl.load(dg + tok * H + i_h)
            else:
                qdq_t = tl.load(dg + p_k + o_k, mask=m_k, other=0)  # [BK]
            # dk'_t = (D_{t+1} dS_{t+1}) v_t [BK]; at t = T, dk'_T = dht v_T is left out: it cancels the
            # k_T^T v_T that the final-state term no longer has
            dk_fut = tl.where(i == 0, 0, tl.sum(dS * v_t[None, :], axis=1))
            if GATE == GATE_SCALAR:
                dg_acc += qdq_t - tl.sum(k_t * dk_fut, axis=0)
                tl.store(dg + tok * H + i_h, dg_acc)
            else:
                dg_acc += qdq_t - k_t * dk_fut
                tl.store(dg + p_k + o_k, dg_acc, mask=m_k)
        dS += (scale * q_t)[:, None] * do_t[None, :]
        dk_t = tl.sum(dS * v_t[None, :], axis=1)  # [BK]
        dv_t = tl.sum(dS * k_t[:, None], axis=0)  # [BV]
        tl.store(dk + p_k + o_k, dk_t, mask=m_k)
        tl.store(dv + p_v + o_v, dv_t.to(dv.dtype.element_ty), mask=m_v)
        if GATE != GATE_NONE:
            dS = _decay(dS, g, tok, i_h, o_k, m_k, H, K, GATE)
    if USE_H0:
        tl.store(dh0 + p_state + o_kv, dS.to(dh0.dtype.element_ty), mask=m_kv)


def _blocks(K: int, V: int):
    """BK covers all of K (o_t sums over it); BV keeps the state block within STATE_BLOCK_ELEMENTS."""
    if K > MAX_K:
        raise ValueError(f"fused recurrent linear_attention: K = {K} > {MAX_K} does not fit one program's registers")
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(16, STATE_BLOCK_ELEMENTS // BK))
    return BK, BV


def _gate_form(g):
    if g is None:
        return GATE_NONE.value
    return (GATE_SCALAR if g.dim() == 3 else GATE_KEY).value


def _num_sequences(B, cu_seqlens):
    return B if cu_seqlens is None else cu_seqlens.numel() - 1


def fused_recurrent_fwd(q, k, v, g, scale, initial_state, cu_seqlens, output_final_state, chunk_size):
    """Returns o [B, T, H, V] in v.dtype and the fp32 final state [N, H, K, V] (or None). chunk_size is unused."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BK, BV = _blocks(K, V)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = g.contiguous() if g is not None else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    o = torch.empty_like(v)  # [B, T, H, V]
    final = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    grid = (N * H, triton.cdiv(V, BV))  # N * H on the grid axis without the 65535 limit
    linear_attn_fused_recurrent_fwd_kernel[grid](
        q, k, v, g, h0, o, final, cu_seqlens, scale, T,
        H=H, K=K, V=V, BK=BK, BV=BV, GATE=_gate_form(g),
        USE_H0=h0 is not None, STORE_FINAL=final is not None, IS_VARLEN=cu_seqlens is not None,
    )
    return o, final


def fused_recurrent_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, chunk_size):
    """Returns dq, dk, dv, dg (None without g), dh0 (None without initial_state). chunk_size is unused."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    g = g.contiguous() if g is not None else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    dht = dht.contiguous() if dht is not None else None
    dq = q.new_empty(NV, B, T, H, K, dtype=torch.float32)
    dk = q.new_empty(NV, B, T, H, K, dtype=torch.float32)
    dv = torch.empty_like(v)  # [B, T, H, V]
    dg = q.new_empty(NV, *g.shape, dtype=torch.float32) if g is not None else None
    dh0 = torch.empty_like(h0) if h0 is not None else None
    grid = (N * H, NV)
    linear_attn_fused_recurrent_bwd_kernel[grid](
        q, k, v, g, h0, do, dht, dq, dk, dv, dg, dh0, cu_seqlens, scale, T, B * T,
        H=H, K=K, V=V, BK=BK, BV=BV, GATE=_gate_form(g),
        USE_H0=h0 is not None, USE_DHT=dht is not None, IS_VARLEN=cu_seqlens is not None,
    )
    dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
    dg = dg.sum(0).to(g.dtype) if g is not None else None
    return dq, dk, dv, dg, dh0


def _compile_case(kernel, variant, args):
    """`args` maps each kernel argument to its Triton type (a string) or to its constexpr value."""
    return CompileCase(
        name=f"{kernel.fn.__name__}[{variant}]",
        fn=kernel.fn,
        signature={name: args[name] if isinstance(args[name], str) else "constexpr" for name in kernel.fn.arg_names},
        constexprs={name: value for name, value in args.items() if not isinstance(value, str)},
        num_warps=kernel.default_config.num_warps,
        num_stages=kernel.default_config.num_stages,
    )


def _register_compile_cases():
    """Default configs at K = V = 64 for bf16 and fp32 inputs and each decay form; states in and out."""
    BK, BV = _blocks(64, 64)
    shared = {"cu_seqlens": None, "scale": "fp32", "T": "i32", "H": 4, "K": 64, "V": 64, "BK": BK, "BV": BV,
              "USE_H0": True, "IS_VARLEN": False, "h0": "*fp32"}
    for dtype in ("bf16", "fp32"):
        x = f"*{dtype}"
        for gate, gate_name in ((GATE_NONE.value, "none"), (GATE_SCALAR.value, "scalar"), (GATE_KEY.value, "key")):
            variant = f"{dtype},g={gate_name}"
            has_g = gate != GATE_NONE.value
            fwd = {"q": x, "k": x, "v": x, "o": x, "ht": "*fp32", "STORE_FINAL": True}
            bwd = {"q": x, "k": x, "v": x, "do": x, "dht": "*fp32", "dq": "*fp32", "dk": "*fp32", "dv": x,
                   "dg": "*fp32" if has_g else None, "dh0": "*fp32", "n_tokens": "i32", "USE_DHT": True}
            common = {**shared, "g": x if has_g else None, "GATE": gate}
            register(_compile_case(linear_attn_fused_recurrent_fwd_kernel, variant, {**common, **fwd}))
            register(_compile_case(linear_attn_fused_recurrent_bwd_kernel, variant, {**common, **bwd}))


_register_compile_cases()
