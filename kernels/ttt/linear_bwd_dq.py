"""First backward kernel of `ttt_linear`: the output side, one program per (sequence, head, mini-batch), all in
parallel. Each recomputes its mini-batch (`linear_minibatch.py`) from the forward's saved start weights and,
token-major (transpose for the kernel's feature-major tiles),

    dX = LN backward of dO,   dU = -diag(s) dX,   ds_r = -sum_k dX U,   dA = tril(dU E^T)
    dQ = dO (residual) + dX W^T + dA K (+ dU S_in^T with an open initial mini-batch)

dQ needs nothing from later mini-batches, so it is final here; dX goes to a buffer for the other two
kernels (`linear_bwd_dw.py`, `linear_bwd_dk.py`), which then skip the output half of the recomputation.
The output LN's dgamma, dbeta and ds are written per mini-batch slot and summed on the host.
"""

import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.ttt import linear_common as common
from ipl_layers.kernels.ttt.linear_common import dot, load_kk
from ipl_layers.kernels.ttt.linear_minibatch import (
    load_tokens, minibatch_forward, minibatch_rows, output_bwd, program_setup, store_tokens,
)

# No loop: the stage count does not matter.
DQ_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


@triton.jit
def _dq_minibatch(
    q, k, v, eta, do, Ws, bs, sum_W0, sum_b0, dq, dx, dln_weight, dln_bias, dscale,
    gamma, beta, s_r, m, p0, bos, eos, slot0, i_nh, i_h,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, USE_LN: tl.constexpr,
    USE_RESIDUAL: tl.constexpr, USE_BIAS: tl.constexpr, HAS_SUMS: tl.constexpr,
):
    o_k, o_r = tl.arange(0, BK), tl.arange(0, C)
    m_k = o_k < K
    start, m_r, _ = minibatch_rows(m, p0, bos, eos, C)
    p_state = i_nh.to(tl.int64) * K
    p_slot = ((slot0 + m) * H + i_h) * K
    b = None
    if USE_BIAS:
        b = tl.load(bs + p_slot + o_k, mask=m_k, other=0)
    St_in = None
    sb_in = None
    if HAS_SUMS:
        St_in = load_kk(sum_W0 + p_state * K, o_k, K, BK, True)
        if USE_BIAS:
            sb_in = tl.load(sum_b0 + p_state + o_k, mask=m_k, other=0).to(tl.float32)
    Qt, Kt, Et, Ut, Xt = minibatch_forward(
        q, k, v, eta, load_kk(Ws + p_slot * K, o_k, K, BK, True), b, St_in, sb_in, gamma, beta, s_r, start, i_h,
        m_r, H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS, HAS_SUMS,
    )
    dOt = load_tokens(do, start, i_h, m_r, H, K, BK, C)
    dXt, dgamma, dbeta = output_bwd(Xt, dOt, gamma, K, BK, USE_LN)
    store_tokens(dx, dXt, start, i_h, m_r, H, K, BK, C)
    tl.store(dscale + (slot0 + m) * H * C + i_h * C + o_r, -tl.sum(dXt * Ut, axis=0))
    if USE_LN:
        tl.store(dln_weight + p_slot + o_k, dgamma, mask=m_k)
        tl.store(dln_bias + p_slot + o_k, dbeta, mask=m_k)

    dUt = -dXt * s_r[None, :]
    dAt = tl.where(o_r[:, None] <= o_r[None, :], dot(tl.trans(Et), dUt), 0.0)  # [C, C]: dA^T
    dQt = dot(Kt, dAt)
    # W read again, untransposed, rather than kept from the recomputation
    dQt = dot(load_kk(Ws + p_slot * K, o_k, K, BK), dXt, dQt)
    if HAS_SUMS:
        dQt = dot(tl.trans(St_in), dUt, dQt)
    if USE_RESIDUAL:
        dQt += dOt
    store_tokens(dq, dQt, start, i_h, m_r, H, K, BK, C)


@autotune(DQ_CONFIGS, key=["BK", "C", "USE_LN", "USE_RESIDUAL", "USE_BIAS", "USE_SUMS"])
@triton.jit
def ttt_linear_bwd_dq_kernel(
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
    do,  # [B, T, H, K]
    dq,  # [B, T, H, K]
    dx,  # [B, T, H, K] fp32 out: dL/dX
    dln_weight,  # [NS, H, K] fp32 per-slot partials of the output LN (USE_LN)
    dln_bias,  # [NS, H, K] fp32 (USE_LN)
    dscale,  # [NS, H, C] fp32 per-slot partials
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
    IS_VARLEN: tl.constexpr,
):
    i_nh, m = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, p0, n_mb, slot0, gamma, beta, s_r, _ = program_setup(
        cu_seqlens, position0, ln_weight, ln_bias, scale, i_nh, T, H, K, BK, C, USE_SUMS, IS_VARLEN,
    )
    if m < n_mb:  # the grid covers the longest sequence
        if USE_SUMS and m == 0:  # continues the initial state's open mini-batch
            _dq_minibatch(
                q, k, v, eta, do, Ws, bs, sum_W0, sum_b0, dq, dx, dln_weight, dln_bias, dscale, gamma, beta, s_r,
                m, p0, bos, eos, slot0, i_nh, i_h, H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS, True,
            )
        else:
            _dq_minibatch(
                q, k, v, eta, do, Ws, bs, sum_W0, sum_b0, dq, dx, dln_weight, dln_bias, dscale, gamma, beta, s_r,
                m, p0, bos, eos, slot0, i_nh, i_h, H, K, BK, C, USE_LN, USE_RESIDUAL, USE_BIAS, False,
            )


def _register_compile_cases():
    """Default config at K = 64, b = 16, bf16 and fp32 inputs, every flag on, an initial open mini-batch."""
    f32 = "*fp32"
    for dtype in ("bf16", "fp32"):
        x = f"*{dtype}"
        common.register_case(ttt_linear_bwd_dq_kernel, f"{dtype},K={common.CASE_K},b={common.CASE_C}", {
            "q": x, "k": x, "v": x, "eta": x, "ln_weight": x, "ln_bias": x, "scale": f32, "sum_W0": f32,
            "sum_b0": f32, "position0": "*i64", "Ws": f32, "bs": f32, "do": x, "dq": x, "dx": f32,
            "dln_weight": f32, "dln_bias": f32, "dscale": f32, "cu_seqlens": None, "T": "i32",
            **common.case_constexprs(),
        })


_register_compile_cases()
