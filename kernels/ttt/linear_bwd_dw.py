"""Second backward kernel of `ttt_linear`: the reverse recurrence of the weights' gradients.

Mini-batch m's start weights W_m feed its own outputs and inner gradients and, through W_{m+1} =
W_m - s_C S_out (or as the final state), everything after it. One program per (sequence, head) walks the
mini-batches in reverse carrying dWt = dL/dW_{m+1}^T [K, K] and db in fp32 registers, saves them per
mini-batch for the last kernel (`linear_bwd_dk.py`), and steps them back, token-major:

    dE = A^T dU + K dS_out + dsb_out      (dS_out = -s_C dW_{m+1} through a commit, else the final sums')
    dZ = `ln_l2_grad_bwd` of eta dE (or eta dE without LN)
    dW_m = dW_{m+1} + Q^T dX + K^T dZ,    db_m = db_{m+1} + sum_r (dX + dZ)

dX comes from `linear_bwd_dq.py` (dU = -diag(s) dX), so a step recomputes only the inner gradients and
the causal products: 6 products per mini-batch on the sequential path.
"""

import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.ttt import linear_common as common
from ipl_layers.kernels.ttt.linear_common import dot, load_kk, store_kk
from ipl_layers.kernels.ttt.linear_minibatch import (
    causal_products, inner_grad, load_tokens, minibatch_rows, program_setup,
)
from ipl_layers.kernels.ttt.linear_norm import ln_l2_grad_bwd

# One stage: each step's products depend on the carried dW.
DW_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


@triton.jit
def _dw_minibatch(
    q, k, v, eta, dx, Ws, bs, dsum_W, dsum_b, dWs, dbs,
    dWt, db, gamma, beta, s_r, s_C, m, p0, bos, eos, slot0, i_nh, i_h,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, USE_LN: tl.constexpr,
    USE_RESIDUAL: tl.constexpr, USE_BIAS: tl.constexpr, USE_DSUMS: tl.constexpr,
):
    """Mini-batch m (module docstring): saves dWt, db (at W_{m+1}) in its slot, returns them at W_m."""
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    start, m_r, commit = minibatch_rows(m, p0, bos, eos, C)
    p_state = i_nh.to(tl.int64) * K
    p_slot = ((slot0 + m) * H + i_h) * K
    store_kk(dWs + p_slot * K, dWt, o_k, K, BK, True)
    b = None
    if USE_BIAS:
        tl.store(dbs + p_slot + o_k, db, mask=m_k)
        b = tl.load(bs + p_slot + o_k, mask=m_k, other=0)
    Kt, Gt, Et, e, ln = inner_grad(k, v, eta, load_kk(Ws + p_slot * K, o_k, K, BK, True), b, gamma, beta, start,
                                   i_h, m_r, H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS)
    At = causal_products(Kt, load_tokens(q, start, i_h, m_r, H, K, BK, C), C, USE_BIAS)
    dXt = load_tokens(dx, start, i_h, m_r, H, K, BK, C)

    if commit:
        dEt = -s_C * dot(dWt, Kt)  # (K dS_out)^T
        if USE_BIAS:
            dEt -= s_C * db[:, None]
    else:
        dSt = tl.zeros([BK, BK], dtype=tl.float32)
        if USE_DSUMS:
            dSt += load_kk(dsum_W + p_state * K, o_k, K, BK, True)
        dEt = dot(dSt, Kt)
        if USE_BIAS and USE_DSUMS:
            dEt += tl.load(dsum_b + p_state + o_k, mask=m_k, other=0).to(tl.float32)[:, None]
    dEt = dot(-dXt * s_r[None, :], tl.trans(At), dEt)
    if USE_LN:
        dZt, _, _, _ = ln_l2_grad_bwd(Gt, ln[0], ln[1], ln[2], ln[3], gamma, dEt * e[None, :], m_k, K)
    else:
        dZt = dEt * e[None, :]
    # q and k read again (`load_tokens`)
    dWt = dot(dXt, tl.trans(load_tokens(q, start, i_h, m_r, H, K, BK, C, True)), dWt)
    dWt = dot(dZt, tl.trans(load_tokens(k, start, i_h, m_r, H, K, BK, C, True)), dWt)
    if USE_BIAS:
        db += tl.sum(dXt + dZt, axis=1)
    return dWt, db


@autotune(DW_CONFIGS, key=["BK", "C", "USE_LN", "USE_RESIDUAL", "USE_BIAS", "USE_SUMS"])
@triton.jit
def ttt_linear_bwd_dw_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, K]
    eta,  # [B, T, H]
    ln_weight,  # [H, K]
    ln_bias,  # [H, K]
    scale,  # [H, C] fp32
    position0,  # [N] int64 or None (USE_SUMS False)
    Ws,  # [NS, H, K, K] fp32: the forward's saved start weights
    bs,  # [NS, H, K] fp32 (USE_BIAS)
    dx,  # [B, T, H, K] fp32: dL/dX (`linear_bwd_dq.py`)
    dW_fin,  # [N, H, K, K]: gradient of the final W, or None (USE_DW False)
    db_fin,  # [N, H, K] (USE_DW and USE_BIAS)
    dsum_W,  # [N, H, K, K]: gradient of the final sums, or None (USE_DSUMS False)
    dsum_b,  # [N, H, K]
    dWs,  # [NS, H, K, K] fp32 out: dL/dW at each mini-batch's end (the next start weights)
    dbs,  # [NS, H, K] fp32 out (USE_BIAS)
    dW0,  # [N, H, K, K] fp32 out
    db0,  # [N, H, K] fp32 out (USE_BIAS)
    dsum_W0,  # [N, H, K, K] fp32 out for sequences without tokens (USE_SUMS)
    dsum_b0,  # [N, H, K] fp32 (USE_SUMS and USE_BIAS)
    cu_seqlens,  # [N + 1] or None
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BK: tl.constexpr,
    C: tl.constexpr,
    USE_LN: tl.constexpr,
    USE_RESIDUAL: tl.constexpr,
    USE_BIAS: tl.constexpr,
    USE_SUMS: tl.constexpr,
    USE_DW: tl.constexpr,
    USE_DSUMS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_h, bos, eos, p0, n_mb, slot0, gamma, beta, s_r, s_C = program_setup(
        cu_seqlens, position0, ln_weight, ln_bias, scale, i_nh, T, H, K, BK, C, USE_SUMS, IS_VARLEN,
    )
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    p_state = i_nh.to(tl.int64) * K

    dWt = tl.zeros([BK, BK], dtype=tl.float32)
    db = tl.zeros([BK], dtype=tl.float32)
    if USE_DW:
        dWt += load_kk(dW_fin + p_state * K, o_k, K, BK, True)
        if USE_BIAS:
            db += tl.load(db_fin + p_state + o_k, mask=m_k, other=0).to(tl.float32)
    for i in range(0, n_mb):
        dWt, db = _dw_minibatch(
            q, k, v, eta, dx, Ws, bs, dsum_W, dsum_b, dWs, dbs, dWt, db, gamma, beta, s_r, s_C, n_mb - 1 - i, p0,
            bos, eos, slot0, i_nh, i_h, H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS, USE_DSUMS,
        )
    if USE_SUMS:
        if n_mb == 0:  # no tokens: the final sums are the initial ones
            dS = tl.zeros([BK, BK], dtype=tl.float32)
            dsb = tl.zeros([BK], dtype=tl.float32)
            if USE_DSUMS:
                dS += load_kk(dsum_W + p_state * K, o_k, K, BK)
                if USE_BIAS:
                    dsb += tl.load(dsum_b + p_state + o_k, mask=m_k, other=0).to(tl.float32)
            store_kk(dsum_W0 + p_state * K, dS, o_k, K, BK)
            if USE_BIAS:
                tl.store(dsum_b0 + p_state + o_k, dsb, mask=m_k)
    store_kk(dW0 + p_state * K, dWt, o_k, K, BK, True)
    if USE_BIAS:
        tl.store(db0 + p_state + o_k, db, mask=m_k)


def _register_compile_cases():
    """Default config at K = 64, b = 16, bf16 and fp32 inputs, every flag on, an initial open mini-batch and
    final-state cotangents."""
    f32 = "*fp32"
    for dtype in ("bf16", "fp32"):
        x = f"*{dtype}"
        common.register_case(ttt_linear_bwd_dw_kernel, f"{dtype},K={common.CASE_K},b={common.CASE_C}", {
            "q": x, "k": x, "v": x, "eta": x, "ln_weight": x, "ln_bias": x, "scale": f32, "position0": "*i64",
            "Ws": f32, "bs": f32, "dx": f32, "dW_fin": f32, "db_fin": f32,
            "dsum_W": f32, "dsum_b": f32, "dWs": f32, "dbs": f32, "dW0": f32, "db0": f32, "dsum_W0": f32,
            "dsum_b0": f32, "cu_seqlens": None, "T": "i32", **common.case_constexprs(), "USE_DW": True,
            "USE_DSUMS": True,
        })


_register_compile_cases()
