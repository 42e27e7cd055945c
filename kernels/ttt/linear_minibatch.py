"""One mini-batch of `ttt_linear` in feature-major tiles, shared by the forward and backward kernels.

A program handles mini-batch m of sequence [bos, eos) (tokens flattened to the [B * T] axis) that continues
at position p0 (0 for all but the first): column r of its [BK, C] tiles is position r + 1, token
start + r with start = bos - p0 + m C. Columns before p0 (seen by an earlier call) and past eos are masked
to zero, eta included, so they add nothing to the gradient sums. Written transposed (Wt = W^T, Qt = Q^T, ...)
the dual form of `ipl_layers/ops/ttt_linear_chunk.py` reads, with start weights W, b and the open
mini-batch's sums S_in, sb_in (HAS_SUMS: the first mini-batch of a call continuing mid-mini-batch):

    Zt = Wt Kt + b,   Gt = dl/dZ (`ln_l2_grad`, or Zt - target without LN),   Et = Gt diag(eta)    # [BK, C]
    At = A^T = triu(Kt^T Qt (+ 1 with bias))                                                        # [C, C]
    Ut = S_in^T Qt + sb_in + Et At,   Xt = Wt Qt + b - Ut diag(s),   output LN(Xt) (+ Qt)
"""

import triton
import triton.language as tl

from ipl_layers.kernels.ttt import linear_common as common
from ipl_layers.kernels.ttt.linear_common import dot
from ipl_layers.kernels.ttt.linear_norm import layer_norm_bwd, layer_norm_cols, ln_l2_grad


@triton.jit
def minibatch_rows(m, p0, bos, eos, C: tl.constexpr):
    """start (token of column 0), the [C] mask of this call's tokens, and whether the mini-batch reaches
    position C (its update is committed)."""
    o_r = tl.arange(0, C)
    start = bos - p0 + m * C
    m_r = (o_r >= tl.where(m == 0, p0, 0)) & (start + o_r < eos)
    return start, m_r, start + C <= eos


@triton.jit
def tokens_ptrs(x, start, i_h, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
                AGAIN: tl.constexpr = False):
    """Pointers [BK, C] into x [B, T, H, K] at head i_h: column r is token start + r's K features. AGAIN
    builds the same pointers by other operations (see `load_tokens`)."""
    o_k, o_r = tl.arange(0, BK), tl.arange(0, C)
    base = x + (start * H + i_h) * K
    if AGAIN:
        return (base + o_r * (H * K))[None, :] + o_k[:, None]
    return (base + o_k)[:, None] + (o_r * (H * K))[None, :]


@triton.jit
def tokens_mask(m_r, K: tl.constexpr, BK: tl.constexpr):
    """The [BK, C] mask of the real features of this call's tokens m_r (m_r alone when K fills BK)."""
    if K == BK:
        return tl.broadcast_to(m_r[None, :], (BK, m_r.shape[0]))
    return (tl.arange(0, BK) < K)[:, None] & m_r[None, :]


@triton.jit
def load_tokens(x, start, i_h, m_r, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
                AGAIN: tl.constexpr = False):
    """The [BK, C] fp32 tile of x [B, T, H, K] (head i_h, tokens start..start+C-1), zero off m_r.

    A kernel that needs a tile again much later reads it AGAIN (from cache) through pointers built by
    other operations, which keeps the compiler from merging the reads: a [BK, C] pointer tensor kept from
    the first read to the last holds 2 BK C / 128 registers a thread (4 warps), and a tl.dot operand copy
    of the tile, whole in each warp (C = 16 columns cannot be split), BK C / 32."""
    mask = tokens_mask(m_r, K, BK)
    return tl.load(tokens_ptrs(x, start, i_h, H, K, BK, C, AGAIN), mask=mask, other=0).to(tl.float32)


@triton.jit
def store_tokens(x, val, start, i_h, m_r, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr):
    tl.store(tokens_ptrs(x, start, i_h, H, K, BK, C), val.to(x.dtype.element_ty), mask=tokens_mask(m_r, K, BK))


@triton.jit
def inner_grad(
    k, v, eta, Wt, b, gamma, beta, start, i_h, m_r,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, USE_LN: tl.constexpr,
    USE_RESIDUAL: tl.constexpr, USE_BIAS: tl.constexpr,
):
    """The inner gradients at the start weights: returns Kt, Gt, Et [BK, C], eta [C] (0 off this call) and,
    with USE_LN, what `ln_l2_grad_bwd` needs (x, res, r, mean(gx x); None without)."""
    o_r = tl.arange(0, C)
    m_k = tl.arange(0, BK) < K
    Kt = load_tokens(k, start, i_h, m_r, H, K, BK, C)
    target = load_tokens(v, start, i_h, m_r, H, K, BK, C)
    if USE_RESIDUAL:
        target -= Kt
    e = tl.load(eta + start * H + i_h + o_r * H, mask=m_r, other=0).to(tl.float32)
    Zt = dot(Wt, Kt)
    if USE_BIAS:
        Zt += b[:, None]
    if USE_LN:
        Gt, x, res, r, mean_gxx = ln_l2_grad(Zt, target, gamma, beta, m_k, K)
        ln = (x, res, r, mean_gxx)
    else:
        Gt = Zt - target
        ln = None
    return Kt, Gt, Gt * e[None, :], e, ln


@triton.jit
def causal_products(Kt, Qt, C: tl.constexpr, USE_BIAS: tl.constexpr):
    """At = A^T = triu(Kt^T Qt (+ 1 with bias)) [C, C]: At[j, i] = k_j . q_i (+ 1) for j <= i."""
    o_r = tl.arange(0, C)
    At = dot(tl.trans(Kt), Qt)
    if USE_BIAS:
        At += 1.0  # the cumulative sum of E, for b_i
    return tl.where(o_r[:, None] <= o_r[None, :], At, 0.0)


@triton.jit
def minibatch_forward(
    q, k, v, eta, Wt, b, St_in, sb_in, gamma, beta, s_r, start, i_h, m_r,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, USE_LN: tl.constexpr,
    USE_RESIDUAL: tl.constexpr, USE_BIAS: tl.constexpr, HAS_SUMS: tl.constexpr,
):
    """The module docstring's tiles: returns Qt, Kt, Et [BK, C], Ut and Xt (before the output LN) [BK, C].
    St_in = S_in^T and sb_in are read only with HAS_SUMS, b with USE_BIAS."""
    Qt = load_tokens(q, start, i_h, m_r, H, K, BK, C)
    Xt = dot(Wt, Qt)  # next to inner_grad's product with Wt, so that Wt's operand copy dies early
    Kt, Gt, Et, e, ln = inner_grad(k, v, eta, Wt, b, gamma, beta, start, i_h, m_r, H, K, BK, C, USE_LN,
                                   USE_RESIDUAL, USE_BIAS)
    Ut = dot(Et, causal_products(Kt, Qt, C, USE_BIAS))
    if HAS_SUMS:
        Ut = dot(St_in, Qt, Ut)
        if USE_BIAS:
            Ut += sb_in[:, None]
    Xt -= Ut * s_r[None, :]
    if USE_BIAS:
        Xt += b[:, None]
    return Qt, Kt, Et, Ut, Xt


@triton.jit
def output_bwd(Xt, dOt, gamma, K: tl.constexpr, BK: tl.constexpr, USE_LN: tl.constexpr):
    """dXt for the cotangent dOt of the output LN(Xt) (the residual's share aside), with the row sums of
    dgamma, dbeta [BK]."""
    m_k = tl.arange(0, BK) < K
    if USE_LN:
        x, r = layer_norm_cols(Xt, m_k, K)
        dXt, dgamma, dbeta = layer_norm_bwd(x, r, gamma, dOt, m_k, K)
    else:
        dXt = dOt
        dgamma = tl.zeros([BK], dtype=tl.float32)
        dbeta = tl.zeros([BK], dtype=tl.float32)
    return dXt, dgamma, dbeta


@triton.jit
def program_setup(
    cu_seqlens, position0, ln_weight, ln_bias, scale, i_nh, T,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, USE_SUMS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """What every program of (sequence, head) i_nh needs: returns i_h, bos, eos, the open initial position p0,
    the number of mini-batches n_mb, the first slot, and the head's LN gamma, beta [BK] and scales s [C],
    s_C (s at position C)."""
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = common.sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    p0 = 0
    if USE_SUMS:
        p0 = tl.load(position0 + i_n).to(tl.int64)
    n_mb = tl.where(eos > bos, tl.cdiv(p0 + eos - bos, C), 0)
    o_k = tl.arange(0, BK)
    gamma = tl.load(ln_weight + i_h * K + o_k, mask=o_k < K, other=0).to(tl.float32)
    beta = tl.load(ln_bias + i_h * K + o_k, mask=o_k < K, other=0).to(tl.float32)
    s_r = tl.load(scale + i_h * C + tl.arange(0, C))
    s_C = tl.load(scale + i_h * C + C - 1)
    return i_h, bos, eos, p0, n_mb, common.first_slot(bos, i_n, C), gamma, beta, s_r, s_C
