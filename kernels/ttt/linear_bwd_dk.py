"""Last backward kernel of `ttt_linear`: the inner side, one program per (sequence, head, mini-batch), all in
parallel once `linear_bwd_dw.py` has saved dL/dW at every mini-batch's end. Token-major (transpose for the
kernel's feature-major tiles), with dX from `linear_bwd_dq.py`, dU = -diag(s) dX, dA = tril(dU E^T) and
dS_out / dsb_out the gradients of the mini-batch's sums (-s_C dW / -s_C db through a commit into the next
start weights, else those of the final state's sums):

    ds_C = -<dW, S_out> - <db, sb_out>,   dE = A^T dU + K dS_out + dsb_out,   deta = sum_k dE G
    dZ, dtarget = `ln_l2_grad_bwd` of eta dE (or eta dE, -eta dE without LN)
    dK = dA^T Q + E dS_out^T + dZ W^T (- dtarget with the residual),   dV = dtarget
    dS_in = dS_out + Q^T dU,   dsb_in = dsb_out + sum_r dU     (an open initial mini-batch: dsum_W0, dsum_b0)

The inner LN's dgamma, dbeta and ds_C are written per mini-batch slot and summed on the host.
"""

import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.ttt import linear_common as common
from ipl_layers.kernels.ttt.linear_common import dot, load_kk, store_kk
from ipl_layers.kernels.ttt.linear_minibatch import (
    causal_products, inner_grad, load_tokens, minibatch_rows, program_setup, store_tokens,
)
from ipl_layers.kernels.ttt.linear_norm import ln_l2_grad_bwd

# No loop: the stage count does not matter. At K = 64, b = 16 4 warps spill (about 300 bytes on sm_80): the
# dW products of a commit come on top of the recomputation; 8 warps share the [K, K] tiles wider.
DK_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (8, 4)]


@triton.jit
def _dk_minibatch(
    q, k, v, eta, dx, Ws, bs, sum_W0, sum_b0, dWs, dbs, dsum_W, dsum_b, dk, dv, deta, dsum_W0, dsum_b0,
    dln_weight, dln_bias, dscale_C, gamma, beta, s_r, s_C, m, p0, bos, eos, slot0, i_nh, i_h,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, USE_LN: tl.constexpr,
    USE_RESIDUAL: tl.constexpr, USE_BIAS: tl.constexpr, USE_DSUMS: tl.constexpr, HAS_SUMS: tl.constexpr,
):
    o_k, o_r = tl.arange(0, BK), tl.arange(0, C)
    m_k = o_k < K
    start, m_r, commit = minibatch_rows(m, p0, bos, eos, C)
    p_state = i_nh.to(tl.int64) * K
    p_slot = ((slot0 + m) * H + i_h) * K
    b = None
    if USE_BIAS:
        b = tl.load(bs + p_slot + o_k, mask=m_k, other=0)
    Kt, Gt, Et, e, ln = inner_grad(k, v, eta, load_kk(Ws + p_slot * K, o_k, K, BK, True), b, gamma, beta, start,
                                   i_h, m_r, H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS)
    Qt = load_tokens(q, start, i_h, m_r, H, K, BK, C)
    At = causal_products(Kt, Qt, C, USE_BIAS)
    dUt = -load_tokens(dx, start, i_h, m_r, H, K, BK, C) * s_r[None, :]
    dAt = tl.where(o_r[:, None] <= o_r[None, :], dot(tl.trans(Et), dUt), 0.0)  # [C, C]: dA^T
    dKt = dot(Qt, tl.trans(dAt))

    # the sums: committed into the next start weights, or the final state's (q and k read again)
    Kt = load_tokens(k, start, i_h, m_r, H, K, BK, C, True)
    ds_C = s_C * 0.0  # d/ds_C: only through a commit
    if commit:
        # dL/dW at the next start weights, read as dW^T and as dW for the two products (two reads: one
        # read converted to both operand layouts would keep three [K, K] copies alive)
        KdW = dot(load_kk(dWs + p_slot * K, o_k, K, BK, True), Kt)  # (K dW)^T; (K dS_out)^T = -s_C KdW
        ds_C = -tl.sum(tl.sum(Et * KdW, axis=1), axis=0)  # -<dW, K^T E>
        dEt = -s_C * KdW
        dKt = dot(load_kk(dWs + p_slot * K, o_k, K, BK), -s_C * Et, dKt)
        if HAS_SUMS:
            dWt = load_kk(dWs + p_slot * K, o_k, K, BK, True, True)
            St_in = load_kk(sum_W0 + p_state * K, o_k, K, BK, True)
            ds_C -= tl.sum(tl.sum(dWt * St_in, axis=1), axis=0)
            dSt_in = dot(dUt, tl.trans(load_tokens(q, start, i_h, m_r, H, K, BK, C, True)), -s_C * dWt)
        if USE_BIAS:
            db = tl.load(dbs + p_slot + o_k, mask=m_k, other=0)
            sb_out = tl.sum(Et, axis=1)
            if HAS_SUMS:
                sb_out += tl.load(sum_b0 + p_state + o_k, mask=m_k, other=0).to(tl.float32)
            ds_C -= tl.sum(db * sb_out, axis=0)
            dEt -= s_C * db[:, None]
            dsb_in = tl.sum(dUt, axis=1) - s_C * db
    else:
        dSt = tl.zeros([BK, BK], dtype=tl.float32)
        dsb = tl.zeros([BK], dtype=tl.float32)
        if USE_DSUMS:
            dSt += load_kk(dsum_W + p_state * K, o_k, K, BK, True)
            if USE_BIAS:
                dsb += tl.load(dsum_b + p_state + o_k, mask=m_k, other=0).to(tl.float32)
        dEt = dot(dSt, Kt)
        dKt = dot(tl.trans(dSt), Et, dKt)
        if HAS_SUMS:
            dSt_in = dot(dUt, tl.trans(load_tokens(q, start, i_h, m_r, H, K, BK, C, True)), dSt)
        if USE_BIAS:
            dEt += dsb[:, None]
            dsb_in = tl.sum(dUt, axis=1) + dsb
    tl.store(dscale_C + (slot0 + m) * H + i_h, ds_C)
    if HAS_SUMS:
        store_kk(dsum_W0 + p_state * K, dSt_in, o_k, K, BK, True)
        if USE_BIAS:
            tl.store(dsum_b0 + p_state + o_k, dsb_in, mask=m_k)

    # the inner gradient, and through the start weights again (read untransposed rather than kept)
    dEt = dot(dUt, tl.trans(At), dEt)
    tl.store(deta + start * H + i_h + o_r * H, tl.sum(dEt * Gt, axis=0).to(deta.dtype.element_ty), mask=m_r)
    if USE_LN:
        dZt, dtarget, dgamma, dbeta = ln_l2_grad_bwd(Gt, ln[0], ln[1], ln[2], ln[3], gamma, dEt * e[None, :], m_k,
                                                     K)
        tl.store(dln_weight + p_slot + o_k, dgamma, mask=m_k)
        tl.store(dln_bias + p_slot + o_k, dbeta, mask=m_k)
    else:
        dZt = dEt * e[None, :]
        dtarget = -dZt
    if USE_RESIDUAL:
        dKt -= dtarget
    dKt = dot(load_kk(Ws + p_slot * K, o_k, K, BK), dZt, dKt)
    store_tokens(dk, dKt, start, i_h, m_r, H, K, BK, C)
    store_tokens(dv, dtarget, start, i_h, m_r, H, K, BK, C)


@autotune(DK_CONFIGS, key=["BK", "C", "USE_LN", "USE_RESIDUAL", "USE_BIAS", "USE_SUMS"])
@triton.jit
def ttt_linear_bwd_dk_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, K]
    eta,  # [B, T, H]
    ln_weight,  # [H, K]
    ln_bias,  # [H, K]
    scale,  # [H, C] fp32
    sum_W0,  # [N, H, K, K] or None (USE_SUMS False)
    sum_b0,  # [N, H, K] or None
    position0,  # [N] int64 or None
    Ws,  # [NS, H, K, K] fp32: the forward's saved start weights
    bs,  # [NS, H, K] fp32 (USE_BIAS)
    dx,  # [B, T, H, K] fp32: dL/dX (`linear_bwd_dq.py`)
    dWs,  # [NS, H, K, K] fp32: dL/dW at each mini-batch's end (`linear_bwd_dw.py`)
    dbs,  # [NS, H, K] fp32 (USE_BIAS)
    dsum_W,  # [N, H, K, K]: gradient of the final sums, or None (USE_DSUMS False)
    dsum_b,  # [N, H, K]
    dk,  # [B, T, H, K]
    dv,  # [B, T, H, K]
    deta,  # [B, T, H]
    dsum_W0,  # [N, H, K, K] fp32 out (USE_SUMS)
    dsum_b0,  # [N, H, K] fp32 out (USE_SUMS and USE_BIAS)
    dln_weight,  # [NS, H, K] fp32 per-slot partials of the inner LN (USE_LN)
    dln_bias,  # [NS, H, K] fp32 (USE_LN)
    dscale_C,  # [NS, H] fp32 per-slot partials of ds at position C
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
    USE_DSUMS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_nh, m = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, p0, n_mb, slot0, gamma, beta, s_r, s_C = program_setup(
        cu_seqlens, position0, ln_weight, ln_bias, scale, i_nh, T, H, K, BK, C, USE_SUMS, IS_VARLEN,
    )
    if m < n_mb:  # the grid covers the longest sequence
        if USE_SUMS and m == 0:  # continues the initial state's open mini-batch
            _dk_minibatch(
                q, k, v, eta, dx, Ws, bs, sum_W0, sum_b0, dWs, dbs, dsum_W, dsum_b, dk, dv, deta, dsum_W0,
                dsum_b0, dln_weight, dln_bias, dscale_C, gamma, beta, s_r, s_C, m, p0, bos, eos, slot0, i_nh, i_h,
                H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS, USE_DSUMS, True,
            )
        else:
            _dk_minibatch(
                q, k, v, eta, dx, Ws, bs, sum_W0, sum_b0, dWs, dbs, dsum_W, dsum_b, dk, dv, deta, dsum_W0,
                dsum_b0, dln_weight, dln_bias, dscale_C, gamma, beta, s_r, s_C, m, p0, bos, eos, slot0, i_nh, i_h,
                H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS, USE_DSUMS, False,
            )


def _register_compile_cases():
    """Default config at K = 64, b = 16, bf16 and fp32 inputs, every flag on, an initial open mini-batch and
    final-state cotangents."""
    f32 = "*fp32"
    for dtype in ("bf16", "fp32"):
        x = f"*{dtype}"
        common.register_case(ttt_linear_bwd_dk_kernel, f"{dtype},K={common.CASE_K},b={common.CASE_C}", {
            "q": x, "k": x, "v": x, "eta": x, "ln_weight": x, "ln_bias": x, "scale": f32, "sum_W0": f32,
            "sum_b0": f32, "position0": "*i64", "Ws": f32, "bs": f32, "dx": f32, "dWs": f32, "dbs": f32,
            "dsum_W": f32, "dsum_b": f32, "dk": x, "dv": x, "deta": x, "dsum_W0": f32, "dsum_b0": f32,
            "dln_weight": f32, "dln_bias": f32, "dscale_C": f32, "cu_seqlens": None, "T": "i32",
            **common.case_constexprs(), "USE_DSUMS": True,
        })


_register_compile_cases()
