"""Forward Triton kernel of `ttt_linear`: one program per (sequence, head) walks the sequence one mini-batch
of C tokens at a time in feature-major tiles (`linear_minibatch.py`), with the inner weights as Wt = W^T
[K, K] and b [K] in fp32. After a mini-batch's outputs, its gradient sums

    St_out = S_out^T = St_in + Et Kt^T,   sb_out = sb_in + sum_r Et[:, r]

commit into the weights if it is full: Wt <- Wt - s_C St_out, b <- b - s_C sb_out. A sequence ending inside
a mini-batch keeps that mini-batch's start weights and hands out the sums (`TTTLinearState`). The weights
at every mini-batch start are saved for the backward (slots: `linear_common.num_slots`), and W passes from
one mini-batch to the next through those slots rather than registers (b, [K], stays in registers).
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.ttt import linear_common as common
from ipl_layers.kernels.ttt.linear_common import dot, load_kk, store_kk
from ipl_layers.kernels.ttt.linear_minibatch import minibatch_forward, minibatch_rows, program_setup, store_tokens
from ipl_layers.kernels.ttt.linear_norm import layer_norm_cols

# Loops over mini-batches whose loads depend on the previous step's weights: one stage.
FWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


@triton.jit
def _fwd_minibatch(
    q, k, v, eta, o, Ws, bs, sum_W0, sum_b0, W_out, sum_W, sum_b,
    b, gamma, beta, s_r, s_C, m, p0, bos, eos, slot0, i_nh, i_h,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, USE_LN: tl.constexpr,
    USE_RESIDUAL: tl.constexpr, USE_BIAS: tl.constexpr, HAS_SUMS: tl.constexpr,
):
    """Mini-batch m of the sequence [bos, eos) (module docstring): reads its start weights from its slot,
    writes the next ones to the next slot (or the final state's W); returns the next b."""
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    start, m_r, commit = minibatch_rows(m, p0, bos, eos, C)
    last = start + C >= eos
    p_slot = ((slot0 + m) * H + i_h) * K
    p_state = i_nh.to(tl.int64) * K
    if USE_BIAS:
        tl.store(bs + p_slot + o_k, b, mask=m_k)
    St_in = None
    sb_in = None
    if HAS_SUMS:
        St_in = load_kk(sum_W0 + p_state * K, o_k, K, BK, True)
        if USE_BIAS:
            sb_in = tl.load(sum_b0 + p_state + o_k, mask=m_k, other=0).to(tl.float32)

    tl.debug_barrier()  # the slot's weights were written by all threads of the step before
    Qt, Kt, Et, Ut, Xt = minibatch_forward(
        q, k, v, eta, load_kk(Ws + p_slot * K, o_k, K, BK, True), b, St_in, sb_in, gamma, beta, s_r, start, i_h,
        m_r, H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS, HAS_SUMS,
    )
    if USE_LN:
        x, _ = layer_norm_cols(Xt, m_k, K)
        Xt = x * gamma[:, None] + beta[:, None]
    if USE_RESIDUAL:
        Xt += Qt
    store_tokens(o, Xt, start, i_h, m_r, H, K, BK, C)

    St_out = dot(Et, tl.trans(Kt))  # [BK, BK]
    sb_out = tl.sum(Et, axis=1)  # [BK]
    if HAS_SUMS:
        St_out += St_in
        if USE_BIAS:
            sb_out += sb_in
    Wt = load_kk(Ws + p_slot * K, o_k, K, BK, True, True)  # read again (`load_kk`)
    Wt = tl.where(commit, Wt - s_C * St_out, Wt)
    if last:  # the final state: the open mini-batch's start weights and sums (zero sums once committed)
        store_kk(W_out + p_state * K, Wt, o_k, K, BK, True)
        store_kk(sum_W + p_state * K, tl.where(commit, 0.0, St_out), o_k, K, BK, True)
        if USE_BIAS:
            tl.store(sum_b + p_state + o_k, tl.where(commit, 0.0, sb_out), mask=m_k)
    else:
        store_kk(Ws + (p_slot + H * K) * K, Wt, o_k, K, BK, True)
    if USE_BIAS:
        b = tl.where(commit, b - s_C * sb_out, b)
    return b


@autotune(FWD_CONFIGS, key=["BK", "C", "USE_LN", "USE_RESIDUAL", "USE_BIAS", "USE_SUMS"])
@triton.jit
def ttt_linear_fwd_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, K]
    eta,  # [B, T, H]
    ln_weight,  # [H, K] (unused without LN)
    ln_bias,  # [H, K]
    scale,  # [H, C] fp32: s_r per head and position
    W0,  # [N, H, K, K] or None (zeros)
    b0,  # [N, H, K] or None (zeros)
    sum_W0,  # [N, H, K, K] or None (USE_SUMS False: no open mini-batch)
    sum_b0,  # [N, H, K] or None
    position0,  # [N] int64 or None
    o,  # [B, T, H, K]
    W_out,  # [N, H, K, K] fp32: start weights of the open mini-batch after the last token
    b_out,  # [N, H, K] fp32 (USE_BIAS)
    sum_W,  # [N, H, K, K] fp32: its gradient sums
    sum_b,  # [N, H, K] fp32 (USE_BIAS)
    Ws,  # [NS, H, K, K] fp32: W at each mini-batch start
    bs,  # [NS, H, K] fp32 (USE_BIAS)
    cu_seqlens,  # [N + 1] or None
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BK: tl.constexpr,
    C: tl.constexpr,
    USE_LN: tl.constexpr,
    USE_RESIDUAL: tl.constexpr,
    USE_BIAS: tl.constexpr,
    USE_W0: tl.constexpr,
    USE_SUMS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_h, bos, eos, p0, n_mb, slot0, gamma, beta, s_r, s_C = program_setup(
        cu_seqlens, position0, ln_weight, ln_bias, scale, i_nh, T, H, K, BK, C, USE_SUMS, IS_VARLEN,
    )
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    p_state = i_nh.to(tl.int64) * K  # this head's [K] row in [N, H, K]; times K for [N, H, K, K]

    # the weights pass from mini-batch to mini-batch through the saved slots, not registers: a [K, K]
    # fp32 tile carried across the loop would take 32 registers a thread (4 warps) that the step needs
    W = tl.zeros([BK, BK], dtype=tl.float32)
    b = tl.zeros([BK], dtype=tl.float32)
    if USE_W0:
        W += load_kk(W0 + p_state * K, o_k, K, BK)
        if USE_BIAS:
            b += tl.load(b0 + p_state + o_k, mask=m_k, other=0).to(tl.float32)
    if n_mb > 0:
        store_kk(Ws + (slot0 * H + i_h) * K * K, W, o_k, K, BK)
    else:  # no tokens: the initial state passes through
        store_kk(W_out + p_state * K, W, o_k, K, BK)
        if USE_BIAS:
            tl.store(b_out + p_state + o_k, b, mask=m_k)
        S = tl.zeros([BK, BK], dtype=tl.float32)
        sb = tl.zeros([BK], dtype=tl.float32)
        if USE_SUMS:
            S += load_kk(sum_W0 + p_state * K, o_k, K, BK)
            if USE_BIAS:
                sb += tl.load(sum_b0 + p_state + o_k, mask=m_k, other=0).to(tl.float32)
        store_kk(sum_W + p_state * K, S, o_k, K, BK)
        if USE_BIAS:
            tl.store(sum_b + p_state + o_k, sb, mask=m_k)

    m_first = 0
    if USE_SUMS:  # the first mini-batch continues the initial state's open one
        m_first = 1
        if n_mb > 0:
            b = _fwd_minibatch(
                q, k, v, eta, o, Ws, bs, sum_W0, sum_b0, W_out, sum_W, sum_b, b, gamma, beta, s_r, s_C, 0, p0,
                bos, eos, slot0, i_nh, i_h, H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS, True,
            )
    for m in range(m_first, n_mb):
        b = _fwd_minibatch(
            q, k, v, eta, o, Ws, bs, sum_W0, sum_b0, W_out, sum_W, sum_b, b, gamma, beta, s_r, s_C, m, p0, bos,
            eos, slot0, i_nh, i_h, H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS, False,
        )
    if USE_BIAS:
        tl.store(b_out + p_state + o_k, b, mask=m_k)


def ttt_linear_fwd(q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0, position0, cu_seqlens,
                   mini_batch_size, use_ln, use_residual, use_bias):
    """Returns o [B, T, H, K] in v.dtype, the final state W, b, sum_W, sum_b (fp32; b and sum_b zeros without
    bias) and the `TTTLinearSaved` for the backward.

    q, k, v [B, T, H, K]; eta [B, T, H]; ln_weight, ln_bias [H, K] or None (ones, zeros); scale [H, b] (or
    [b]); W0, sum_W0 [N, H, K, K]; b0, sum_b0 [N, H, K]; position0 [N] in [0, b). W0/b0 None: zeros;
    sum_W0 and position0 None together: every sequence starts a fresh mini-batch.
    """
    B, T, H, K = q.shape
    L = common.prepare(q, ln_weight, ln_bias, scale, sum_W0, position0, cu_seqlens, mini_batch_size, use_ln,
                       use_residual, use_bias)
    q, k, v, eta, W0, sum_W0, position0 = common.contiguous(q, k, v, eta, W0, sum_W0, position0)
    b0, sum_b0 = common.bias_states(use_bias, W0, b0, sum_W0, sum_b0)
    f32 = dict(device=q.device, dtype=torch.float32)
    o = torch.empty_like(v)
    W = torch.empty(L.N, H, K, K, **f32)
    sum_W = torch.empty(L.N, H, K, K, **f32)
    b = torch.empty(L.N, H, K, **f32) if use_bias else torch.zeros(L.N, H, K, **f32)
    sum_b = torch.empty(L.N, H, K, **f32) if use_bias else torch.zeros(L.N, H, K, **f32)
    NS = common.num_slots(B * T, L.N, L.C)
    saved = common.TTTLinearSaved(torch.empty(NS, H, K, K, **f32),
                                  torch.empty(NS, H, K, **f32) if use_bias else None)
    ttt_linear_fwd_kernel[(L.N * H,)](
        q, k, v, eta, L.ln_weight, L.ln_bias, L.scale, W0, b0, sum_W0, sum_b0, position0, o, W, b, sum_W, sum_b,
        saved.Ws, saved.bs, cu_seqlens, T, USE_W0=W0 is not None, **L.flags,
    )
    return o, W, b, sum_W, sum_b, saved


def _register_compile_cases():
    """Default config at K = 64, b = 16, bf16 and fp32 inputs, every flag on, an initial open mini-batch."""
    for dtype in ("bf16", "fp32"):
        x = f"*{dtype}"
        common.register_case(ttt_linear_fwd_kernel, f"{dtype},K={common.CASE_K},b={common.CASE_C}", {
            "q": x, "k": x, "v": x, "eta": x, "ln_weight": x, "ln_bias": x, "scale": "*fp32", "W0": "*fp32",
            "b0": "*fp32", "sum_W0": "*fp32", "sum_b0": "*fp32", "position0": "*i64", "o": x, "W_out": "*fp32",
            "b_out": "*fp32", "sum_W": "*fp32", "sum_b": "*fp32", "Ws": "*fp32", "bs": "*fp32", "cu_seqlens": None,
            "T": "i32", **common.case_constexprs(), "USE_W0": True,
        })


_register_compile_cases()
