"""Fused decode step of `ttt_linear`: one token per sequence, the state updated in place (inference).

One program per (sequence, head) reads the open mini-batch's start weights W [K, K], b and gradient sums
S, sb and its position p from the `TTTLinearState`, and for the token (q, k, v, eta), token-major:

    G = dl/dz at z = k W + b,   S += eta k^T G,   sb += eta G,   p <- p + 1
    o = LN(q (W - s_p S) + b - s_p sb) (+ q)

committing W <- W - s_p S, b <- b - s_p sb and zeroing the sums when p reaches the mini-batch size. The
H programs of a sequence share its position, so the host advances it after the kernel.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.ttt import linear_common as common
from ipl_layers.kernels.ttt.linear_common import load_kk, store_kk
from ipl_layers.kernels.ttt.linear_norm import layer_norm_cols, ln_l2_grad

DECODE_WARPS = 4  # W and S [64, 64] fp32 take 32 registers a thread each


@triton.jit
def ttt_linear_decode_kernel(
    q,  # [N, 1, H, K]
    k,  # [N, 1, H, K]
    v,  # [N, 1, H, K]
    eta,  # [N, 1, H]
    ln_weight,  # [H, K]
    ln_bias,  # [H, K]
    scale,  # [H, C] fp32
    W,  # [N, H, K, K] fp32, in place
    b,  # [N, H, K] fp32, in place (USE_BIAS)
    sum_W,  # [N, H, K, K] fp32, in place
    sum_b,  # [N, H, K] fp32, in place (USE_BIAS)
    position,  # [N] int64: tokens of the open mini-batch before this one
    o,  # [N, 1, H, K]
    H: tl.constexpr,
    K: tl.constexpr,
    BK: tl.constexpr,
    C: tl.constexpr,
    USE_LN: tl.constexpr,
    USE_RESIDUAL: tl.constexpr,
    USE_BIAS: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n, i_h = i_nh // H, i_nh % H
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    p_tok = i_nh.to(tl.int64) * K  # token n, head h in [N, 1, H, K]; the same row in [N, H, K]
    p = tl.load(position + i_n).to(tl.int32)
    s_p = tl.load(scale + i_h * C + p)  # s at position p + 1
    gamma = tl.load(ln_weight + i_h * K + o_k, mask=m_k, other=0).to(tl.float32)
    beta = tl.load(ln_bias + i_h * K + o_k, mask=m_k, other=0).to(tl.float32)

    q_t = tl.load(q + p_tok + o_k, mask=m_k, other=0).to(tl.float32)  # [BK]
    k_t = tl.load(k + p_tok + o_k, mask=m_k, other=0).to(tl.float32)
    target = tl.load(v + p_tok + o_k, mask=m_k, other=0).to(tl.float32)
    if USE_RESIDUAL:
        target -= k_t
    e = tl.load(eta + i_nh).to(tl.float32)

    Wm = load_kk(W + p_tok * K, o_k, K, BK)  # [BK, BK]: W[i, j], in-feature i
    z = tl.sum(k_t[:, None] * Wm, axis=0)  # [BK]
    bias = tl.zeros([BK], dtype=tl.float32)
    if USE_BIAS:
        bias += tl.load(b + p_tok + o_k, mask=m_k, other=0)
        z += bias
    if USE_LN:  # the feature-major helpers on one column
        G, _, _, _, _ = ln_l2_grad(z[:, None], target[:, None], gamma, beta, m_k, K)
        G = tl.sum(G, axis=1)
    else:
        G = z - target
    S = load_kk(sum_W + p_tok * K, o_k, K, BK) + (e * k_t)[:, None] * G[None, :]
    x = tl.sum(q_t[:, None] * (Wm - s_p * S), axis=0)  # [BK]
    if USE_BIAS:
        sb = tl.load(sum_b + p_tok + o_k, mask=m_k, other=0) + e * G
        x += bias - s_p * sb
    if USE_LN:
        xn, _ = layer_norm_cols(x[:, None], m_k, K)
        x = tl.sum(xn, axis=1) * gamma + beta
    if USE_RESIDUAL:
        x += q_t
    tl.store(o + p_tok + o_k, x.to(o.dtype.element_ty), mask=m_k)

    commit = p + 1 == C  # the mini-batch is full: its update is committed, its sums restart
    store_kk(W + p_tok * K, tl.where(commit, Wm - s_p * S, Wm), o_k, K, BK)
    store_kk(sum_W + p_tok * K, tl.where(commit, 0.0, S), o_k, K, BK)
    if USE_BIAS:
        tl.store(b + p_tok + o_k, tl.where(commit, bias - s_p * sb, bias), mask=m_k)
        tl.store(sum_b + p_tok + o_k, tl.where(commit, 0.0, sb), mask=m_k)


def ttt_linear_decode(q, k, v, eta, ln_weight, ln_bias, scale, state, use_ln, use_residual, use_bias):
    """One decode step: q, k, v [N, 1, H, K], eta [N, 1, H]; ln_weight, ln_bias [H, K] or None (ones, zeros);
    scale [H, b] (or [b]); state a `TTTLinearState` of fp32 contiguous W, b, sum_W, sum_b and int64
    position, updated in place (the position advanced, the update committed at the mini-batch's end).
    Returns o [N, 1, H, K] in v.dtype. No autograd."""
    N, T, H, K = q.shape
    if T != 1:
        raise ValueError(f"ttt_linear_decode: expected one token per sequence, q [N, 1, H, K], got T = {T}")
    BK = common.block_k(K)
    C = scale.shape[-1]
    for name, x, shape in (("W", state.W, (N, H, K, K)), ("b", state.b, (N, H, K)),
                           ("sum_W", state.sum_W, (N, H, K, K)), ("sum_b", state.sum_b, (N, H, K))):
        if x.dtype != torch.float32 or not x.is_contiguous() or tuple(x.shape) != shape or x.device != q.device:
            raise ValueError(f"ttt_linear_decode: state {name} is updated in place and must be a contiguous fp32 "
                             f"tensor {list(shape)} on {q.device}, got {x.dtype} {list(x.shape)} on {x.device}"
                             f"{'' if x.is_contiguous() else ' (not contiguous)'}")
    if state.position.dtype != torch.int64 or tuple(state.position.shape) != (N,):
        raise ValueError(f"ttt_linear_decode: state position must be an int64 tensor [{N}], got "
                         f"{state.position.dtype} {list(state.position.shape)}")
    ln_weight = q.new_ones(H, K) if ln_weight is None else ln_weight.contiguous()
    ln_bias = q.new_zeros(H, K) if ln_bias is None else ln_bias.contiguous()
    scale = scale.to(torch.float32).expand(H, C).contiguous()
    q, k, v, eta = q.contiguous(), k.contiguous(), v.contiguous(), eta.contiguous()
    o = torch.empty_like(v)
    ttt_linear_decode_kernel[(N * H,)](
        q, k, v, eta, ln_weight, ln_bias, scale, state.W, state.b, state.sum_W, state.sum_b, state.position, o,
        H=H, K=K, BK=BK, C=C, USE_LN=bool(use_ln), USE_RESIDUAL=bool(use_residual), USE_BIAS=bool(use_bias),
        num_warps=DECODE_WARPS,
    )
    state.position.add_(1).remainder_(C)
    return o


def _register_compile_cases():
    """K = 64, b = 16, bf16 and fp32 inputs, every flag on."""
    f32 = "*fp32"
    for dtype in ("bf16", "fp32"):
        x = f"*{dtype}"
        common.register_case(ttt_linear_decode_kernel, f"{dtype},K={common.CASE_K},b={common.CASE_C}", {
            "q": x, "k": x, "v": x, "eta": x, "ln_weight": x, "ln_bias": x, "scale": f32, "W": f32, "b": f32,
            "sum_W": f32, "sum_b": f32, "position": "*i64", "o": x, "H": common.CASE_HEADS, "K": common.CASE_K,
            "BK": common.CASE_K, "C": common.CASE_C, "USE_LN": True, "USE_RESIDUAL": True, "USE_BIAS": True,
        }, num_warps=DECODE_WARPS)


_register_compile_cases()
