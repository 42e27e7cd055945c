"""The layer norms of the `ttt_linear` kernels, on feature-major tiles [BK, R]: column r is one token's K
features (rows past K are padding and must be zero on input). Means divide by the real K; results whose
padding would pick up a subtracted mean are masked back to zero, so padding stays zero downstream.

The inner gradient (math in `ipl_layers/ops/ttt_linear_chunk.py: ln_l2_grad`), per column with
r = 1 / sqrt(var z + eps), x = (z - mean z) r, gx = gamma (gamma x + beta - t):

    G = r (gx - mean(gx) - x mean(gx x))

Its backward, for a cotangent dG (dh = r dG):

    dgx = dh - mean(dh) - x mean(dh x),     dx = gamma^2 dgx - mean(gx x) dh - gx mean(dh x)
    dz  = r (dx - mean(dx) - x (mean(dx x) + mean(dG G)))        (the last term: G's own factor r)
    dt  = -gamma dgx,    dgamma = dgx (gamma x + beta - t + gamma x),    dbeta = dgx gamma
"""

import triton
import triton.language as tl

LN_EPS = tl.constexpr(1e-6)  # the op's LN epsilon (`ttt_linear_chunk.LN_EPS`)


@triton.jit
def layer_norm_cols(z, m_k, K: tl.constexpr):
    """x = (z - mean) / sqrt(var + eps) per column of z [BK, R]: returns x [BK, R] (zero in the padding)
    and r = 1 / sqrt(var + eps) [R]."""
    mu = tl.sum(z, axis=0) / K
    zc = tl.where(m_k[:, None], z - mu[None, :], 0.0)
    r = tl.rsqrt(tl.sum(zc * zc, axis=0) / K + LN_EPS)
    return zc * r[None, :], r


@triton.jit
def layer_norm_bwd(x, r, gamma, dy, m_k, K: tl.constexpr):
    """Backward of y = gamma x + beta, x = layer_norm_cols(z): returns dz [BK, R] and the row sums of
    dgamma, dbeta [BK] over the columns."""
    dx = dy * gamma[:, None]
    mean_dx = tl.sum(dx, axis=0) / K
    mean_dxx = tl.sum(dx * x, axis=0) / K
    dz = tl.where(m_k[:, None], (dx - mean_dx[None, :] - x * mean_dxx[None, :]) * r[None, :], 0.0)
    return dz, tl.sum(dy * x, axis=1), tl.sum(dy, axis=1)


@triton.jit
def ln_l2_grad(z, target, gamma, beta, m_k, K: tl.constexpr):
    """G = d/dz 1/2 ||LN(z) - target||^2 per column of z [BK, R] (module docstring), zero in the padding,
    with what its backward needs: x, res = LN(z) - target [BK, R], r and mean(gx x) [R]. The backward takes
    these rather than recomputing them from z: the compiler would merge the recomputation with this one
    and keep all of its intermediates alive in between."""
    x, r = layer_norm_cols(z, m_k, K)
    res = x * gamma[:, None] + beta[:, None] - target
    gx = res * gamma[:, None]
    mean_gx = tl.sum(gx, axis=0) / K
    mean_gxx = tl.sum(gx * x, axis=0) / K
    G = tl.where(m_k[:, None], (gx - mean_gx[None, :] - x * mean_gxx[None, :]) * r[None, :], 0.0)
    return G, x, res, r, mean_gxx


@triton.jit
def ln_l2_grad_bwd(G, x, res, r, mean_gxx, gamma, dG, m_k, K: tl.constexpr):
    """Backward of `ln_l2_grad` (given its outputs) for the cotangent dG [BK, R] (zero in the padding):
    returns dz, dtarget [BK, R] and the row sums of dgamma, dbeta [BK] over the columns (module docstring)."""
    gx = res * gamma[:, None]
    dh = dG * r[None, :]
    mean_dh = tl.sum(dh, axis=0) / K
    mean_dhx = tl.sum(dh * x, axis=0) / K
    dgx = tl.where(m_k[:, None], dh - mean_dh[None, :] - x * mean_dhx[None, :], 0.0)
    dx = gamma[:, None] * gamma[:, None] * dgx - mean_gxx[None, :] * dh - gx * mean_dhx[None, :]
    mean_dx = tl.sum(dx, axis=0) / K
    mean_dxx = tl.sum(dx * x, axis=0) / K + tl.sum(dG * G, axis=0) / K
    dz = tl.where(m_k[:, None], (dx - mean_dx[None, :] - x * mean_dxx[None, :]) * r[None, :], 0.0)
    dgamma = tl.sum(dgx * (res + gamma[:, None] * x), axis=1)
    dbeta = tl.sum(dgx * gamma[:, None], axis=1)
    return dz, -gamma[:, None] * dgx, dgamma, dbeta
