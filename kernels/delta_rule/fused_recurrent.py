"""Fused recurrent Triton kernels of `delta_rule`: token-by-token scans for short inputs and decoding.

One program per (sequence, head, V block) holds the state block S [K, BV] in fp32 registers and loops over
the sequence's tokens (math in `ipl_layers/ops/delta_rule.py`). With P_t = D_t S_{t-1} the decayed state
(D_t = exp(g_t), 1 without g), the error e_t = v_t - k_t P_t and u_t = beta_t e_t:

    S_t = P_t + k_t^T u_t,        o_t = scale * q_t S_t

The columns of S evolve independently, so splitting V into blocks is exact. Differentiating one step, with
dS_t = dL/dS_t (the output's scale q_t^T dO_t included) and du_t = k_t dS_t:

    dq_t = scale * S_t dO_t,      dv_t = beta_t du_t,      dbeta_t = du_t . e_t,
    dk_t = dS_t u_t - P_t dv_t,   dP_t = dS_t - k_t^T dv_t,   dg_t = <dP_t, P_t>,   dS_{t-1} = D_t dP_t

The reverse scan never inverts the transition (I - beta k^T k is singular when beta |k|^2 = 1), and dbeta
never divides by beta. dk_t and dg_t need P_t next to dS_t. Reconstructing P_t backwards from S_t needs
1 / D_t, which amplifies rounding by e^{-g}; a telescoping identity for dg (as the linear-attention kernel
uses) sums O(1) terms into a dg ~ e^{g}, losing a factor e^{-g} of relative accuracy (3e3 at g = -8).
So the backward runs:

1. a forward scan that writes dq_t and checkpoints the state at the start of every segment of BT tokens
   ([slots, H, K, V] fp32: O(T / BT) states per sequence and head);
2. a reverse scan over segments: each re-runs its BT steps from its checkpoint, writing P_t into a
   per-program scratch of BT states, then walks them backwards with dS. Every quantity is then a direct
   product of values of size O(1) or O(e^g): no cancellation, whatever the decay.

With V split into blocks, dq, dk, dbeta and dg are partial sums over V blocks: each program writes its own
fp32 partials and the host sums them.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.common.registry import CompileCase, register
from ipl_layers.kernels.linear_attn.fused_recurrent import _sequence_span

# Largest state block one program holds in registers (fp32 elements), which fixes BV for a given K.
# The backward holds three blocks (P_t, dS and the update) where the forward holds one.
FWD_STATE_ELEMENTS = 4096
BWD_STATE_ELEMENTS = 2048
# At this K the backward's smallest block (BV = 16) takes 160 registers a thread (sm_90, 4 warps): beyond
# it the blocks would not fit in registers.
MAX_K = 256
# Tokens per checkpointed segment of the backward: checkpoints cost T / SEGMENT states per (sequence,
# head), the scratch SEGMENT states per program; 32 balances the two near T = 1024.
SEGMENT = 32

# Loops without tl.dot are not software-pipelined, so one stage. Few warps suit decoding (T = 1).
FWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 1, 2, 8)]
BWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


@triton.jit
def _delta_step(S, k, v, beta, g, tok, i_h, o_k, o_v, m_k, m_v, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, GATED: tl.constexpr):
    """One step from S_{t-1} [BK, BV]: returns P_t (decayed state), k_t [BK], e_t [BV], beta_t, S_t."""
    k_t = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
    v_t = tl.load(v + (tok * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
    b_t = tl.load(beta + tok * H + i_h).to(tl.float32)
    P = S
    if GATED:
        P = S * tl.exp(tl.load(g + tok * H + i_h).to(tl.float32))
    e_t = v_t - tl.sum(P * k_t[:, None], axis=0)  # [BV]: v_t - k_t P_t
    S = P + k_t[:, None] * (b_t * e_t)[None, :]
    return P, k_t, e_t, b_t, S


@autotune(FWD_CONFIGS, key=["BK", "BV", "GATED"])
@triton.jit
def delta_rule_fused_recurrent_fwd_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    beta,  # [B, T, H]
    g,  # [B, T, H] or None
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
    GATED: tl.constexpr,
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
        _, _, _, _, S = _delta_step(S, k, v, beta, g, tok, i_h, o_k, o_v, m_k, m_v, H, K, V, GATED)
        q_t = tl.load(q + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        o_t = tl.sum(S * q_t[:, None], axis=0) * scale  # [BV]
        tl.store(o + (tok * H + i_h) * V + o_v, o_t.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        tl.store(ht + p_state + o_kv, S, mask=m_kv)


@autotune(BWD_CONFIGS, key=["BK", "BV", "GATED"])
@triton.jit
def delta_rule_fused_recurrent_bwd_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    beta,  # [B, T, H]
    g,  # [B, T, H] or None
    h0,  # [N, H, K, V] or None
    do,  # [B, T, H, V]
    dht,  # [N, H, K, V] or None
    dq,  # [NV, B, T, H, K] fp32 partials over V blocks
    dk,  # [NV, B, T, H, K] fp32 partials over V blocks
    dv,  # [B, T, H, V]
    dbeta,  # [NV, B, T, H] fp32 partials over V blocks
    dg,  # [NV, B, T, H] fp32 partials over V blocks, or None
    dh0,  # [N, H, K, V] or None
    ckpt,  # [B * T // BT + N, H, K, V] fp32: the state at each segment's start
    scratch,  # [N, H, BT, K, V] fp32: P_t of the segment being walked backwards
    cu_seqlens,  # [N + 1] or None
    scale,
    T,
    n_tokens,  # B * T: the stride between V-block partials is n_tokens * H * K (or n_tokens * H)
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    GATED: tl.constexpr,
    USE_H0: tl.constexpr,
    USE_DHT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    n_seg = (eos - bos + BT - 1) // BT
    # Checkpoint slots: sequence n gets floor(bos / BT) + n onwards. Its ceil(len / BT) slots end at or
    # before the next sequence's first one, so slots never overlap and B * T // BT + N of them suffice.
    p_ckpt = (bos // BT + i_n) * H * K * V + i_h * K * V
    p_scratch = i_nh.to(tl.int64) * BT * K * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_nh.to(tl.int64) * K * V  # this head's state in [N, H, K, V]
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    dq += i_v.to(tl.int64) * n_tokens * H * K
    dk += i_v.to(tl.int64) * n_tokens * H * K
    dbeta += i_v.to(tl.int64) * n_tokens * H
    if GATED:
        dg += i_v.to(tl.int64) * n_tokens * H

    # 1. Forward scan: checkpoints, and dq_t = scale * S_t dO_t.
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + p_state + o_kv, mask=m_kv, other=0).to(tl.float32)
    for seg in range(0, n_seg):
        tl.store(ckpt + p_ckpt + seg * H * K * V + o_kv, S, mask=m_kv)
        start = bos + seg * BT
        for tok in range(start, tl.minimum(start + BT, eos)):
            _, _, _, _, S = _delta_step(S, k, v, beta, g, tok, i_h, o_k, o_v, m_k, m_v, H, K, V, GATED)
            do_t = tl.load(do + (tok * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
            tl.store(dq + (tok * H + i_h) * K + o_k, tl.sum(S * do_t[None, :], axis=1) * scale, mask=m_k)
    # the checkpoints are read back below, possibly by other threads than those that wrote them
    tl.debug_barrier()

    # 2. Reverse scan over segments from dS_T = dht.
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + p_state + o_kv, mask=m_kv, other=0).to(tl.float32)
    for i_seg in range(0, n_seg):
        seg = n_seg - 1 - i_seg
        start = bos + seg * BT
        end = tl.minimum(start + BT, eos)
        # re-run the segment from its checkpoint, keeping every P_t
        S = tl.load(ckpt + p_ckpt + seg * H * K * V + o_kv, mask=m_kv, other=0)
        for tok in range(start, end):
            P, _, _, _, S = _delta_step(S, k, v, beta, g, tok, i_h, o_k, o_v, m_k, m_v, H, K, V, GATED)
            tl.store(scratch + p_scratch + (tok - start) * K * V + o_kv, P, mask=m_kv)
        tl.debug_barrier()  # the P_t written above are read below by other threads
        for i in range(0, end - start):
            tok = end - 1 - i
            P = tl.load(scratch + p_scratch + (tok - start) * K * V + o_kv, mask=m_kv, other=0)
            k_t = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
            v_t = tl.load(v + (tok * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
            q_t = tl.load(q + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
            do_t = tl.load(do + (tok * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
            b_t = tl.load(beta + tok * H + i_h).to(tl.float32)
            e_t = v_t - tl.sum(P * k_t[:, None], axis=0)  # [BV]
            dS += (scale * q_t)[:, None] * do_t[None, :]  # dS_t
            du_t = tl.sum(dS * k_t[:, None], axis=0)  # [BV]
            dv_t = b_t * du_t
            tl.store(dv + (tok * H + i_h) * V + o_v, dv_t.to(dv.dtype.element_ty), mask=m_v)
            tl.store(dbeta + tok * H + i_h, tl.sum(du_t * e_t, axis=0))
            # dk_t = dS_t u_t - P_t dv_t [BK]
            tl.store(dk + (tok * H + i_h) * K + o_k,
                     tl.sum(dS * (b_t * e_t)[None, :] - P * dv_t[None, :], axis=1), mask=m_k)
            dS -= k_t[:, None] * dv_t[None, :]  # dP_t
            if GATED:
                tl.store(dg + tok * H + i_h, tl.sum(tl.sum(dS * P, axis=1), axis=0))
                dS = dS * tl.exp(tl.load(g + tok * H + i_h).to(tl.float32))
        tl.debug_barrier()  # the next segment overwrites the scratch these threads may still read
    if USE_H0:
        tl.store(dh0 + p_state + o_kv, dS.to(dh0.dtype.element_ty), mask=m_kv)


def _blocks(K: int, V: int, state_elements: int):
    """BK covers all of K (o_t sums over it); BV keeps the state block within `state_elements`."""
    if K > MAX_K:
        raise ValueError(f"fused recurrent delta_rule: K = {K} > {MAX_K} does not fit one program's registers")
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(16, state_elements // BK))
    return BK, BV


def _check_gate(g):
    if g is not None and g.dim() != 3:
        raise ValueError(f"fused recurrent delta_rule: g must be a scalar log-decay [B, T, H], got {tuple(g.shape)}")


def _contiguous(x):
    return None if x is None else x.contiguous()


def _num_sequences(B, cu_seqlens):
    return B if cu_seqlens is None else cu_seqlens.numel() - 1


def fused_recurrent_fwd(q, k, v, beta, g, scale, initial_state, cu_seqlens, output_final_state):
    """Returns o [B, T, H, V] in v.dtype and the fp32 final state [N, H, K, V] (or None)."""
    _check_gate(g)
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BK, BV = _blocks(K, V, FWD_STATE_ELEMENTS)
    q, k, v, beta, g, h0 = (_contiguous(x) for x in (q, k, v, beta, g, initial_state))
    o = torch.empty_like(v)  # [B, T, H, V]
    final = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    grid = (N * H, triton.cdiv(V, BV))  # N * H on the grid axis without the 65535 limit
    delta_rule_fused_recurrent_fwd_kernel[grid](
        q, k, v, beta, g, h0, o, final, cu_seqlens, scale, T,
        H=H, K=K, V=V, BK=BK, BV=BV, GATED=g is not None,
        USE_H0=h0 is not None, STORE_FINAL=final is not None, IS_VARLEN=cu_seqlens is not None,
    )
    return o, final


def fused_recurrent_bwd(q, k, v, beta, g, scale, initial_state, cu_seqlens, do, dht):
    """Returns dq, dk, dv, dbeta, dg (None without g), dh0 (None without initial_state) in the inputs' dtypes."""
    _check_gate(g)
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BK, BV = _blocks(K, V, BWD_STATE_ELEMENTS)
    NV = triton.cdiv(V, BV)
    q, k, v, beta, g, h0, do, dht = (_contiguous(x) for x in (q, k, v, beta, g, initial_state, do, dht))
    dq = q.new_empty(NV, B, T, H, K, dtype=torch.float32)
    dk = q.new_empty(NV, B, T, H, K, dtype=torch.float32)
    dv = torch.empty_like(v)  # [B, T, H, V]
    dbeta = q.new_empty(NV, B, T, H, dtype=torch.float32)
    dg = q.new_empty(NV, B, T, H, dtype=torch.float32) if g is not None else None
    dh0 = torch.empty_like(h0) if h0 is not None else None
    ckpt = q.new_empty(B * T // SEGMENT + N, H, K, V, dtype=torch.float32)
    scratch = q.new_empty(N, H, SEGMENT, K, V, dtype=torch.float32)
    grid = (N * H, NV)
    delta_rule_fused_recurrent_bwd_kernel[grid](
        q, k, v, beta, g, h0, do, dht, dq, dk, dv, dbeta, dg, dh0, ckpt, scratch, cu_seqlens, scale, T, B * T,
        H=H, K=K, V=V, BK=BK, BV=BV, BT=SEGMENT, GATED=g is not None,
        USE_H0=h0 is not None, USE_DHT=dht is not None, IS_VARLEN=cu_seqlens is not None,
    )
    dq, dk, dbeta = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dbeta.sum(0).to(beta.dtype)
    dg = dg.sum(0).to(g.dtype) if g is not None else None
    return dq, dk, dv, dbeta, dg, dh0


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
    """Default configs at K = V = 64 for bf16 and fp32 inputs, gated and not; states in and out."""
    shared = {"cu_seqlens": None, "scale": "fp32", "T": "i32", "H": 4, "K": 64, "V": 64, "USE_H0": True,
              "IS_VARLEN": False, "h0": "*fp32"}
    for dtype in ("bf16", "fp32"):
        x = f"*{dtype}"
        for gated in (False, True):
            variant = f"{dtype},g={'scalar' if gated else 'none'}"
            common = {**shared, "q": x, "k": x, "v": x, "beta": x, "g": x if gated else None, "GATED": gated}
            BK, BV = _blocks(64, 64, FWD_STATE_ELEMENTS)
            fwd = {"o": x, "ht": "*fp32", "BK": BK, "BV": BV, "STORE_FINAL": True}
            BK, BV = _blocks(64, 64, BWD_STATE_ELEMENTS)
            bwd = {"do": x, "dht": "*fp32", "dq": "*fp32", "dk": "*fp32", "dv": x, "dbeta": "*fp32",
                   "dg": "*fp32" if gated else None, "dh0": "*fp32", "ckpt": "*fp32", "scratch": "*fp32",
                   "n_tokens": "i32", "BK": BK, "BV": BV, "BT": SEGMENT, "USE_DHT": True}
            register(_compile_case(delta_rule_fused_recurrent_fwd_kernel, variant, {**common, **fwd}))
            register(_compile_case(delta_rule_fused_recurrent_bwd_kernel, variant, {**common, **bwd}))


_register_compile_cases()
