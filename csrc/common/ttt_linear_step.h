// One decoding step of TTT-Linear for one (sequence, head), on raw fp32 pointers (kernels/ttt/linear_decode.py
// is the Triton twin). The open mini-batch holds its start weights W [K, K], b [K], its gradient sums S, sb and
// its position p; for the token (q, k, v, eta), with s = s_p the position scale and t = v - k (v without the
// residual):
//
//     z = k W + b,   G = d/dz 1/2 ||LN(z) - t||^2,   S' = S + eta k^T G,   sb' = sb + eta G
//     x = q (W - s S') + b - s sb',   o = LN(x) (+ q)
//
// and at the mini-batch's end (p + 1 == C) the update is committed: W' = W - s S', b' = b - s sb', S' = sb' = 0.
// LN(y) = (y - mean y) / sqrt(var y + eps) gamma + beta over the K features.
//
// A step runs in phases separated by reductions over the K features: (1) z by columns, (2) G per feature from
// the LN statistics of z, (3) the state update and x by columns, (4) o per feature from the LN statistics of x.
// The CPU op runs each phase over tiles of columns, the CUDA kernel one column per thread with a barrier
// between phases, and both take the statistics with `ttt_ln_stats` on the whole vector: the same code, so the
// CPU tests check the arithmetic the GPU runs.
#pragma once

#include <math.h>

#include "common/host_device.h"

namespace ipl {

constexpr float kTTTLnEps = 1e-6f;  // the op's LN epsilon (ipl_layers/ops/ttt_linear_chunk.py: LN_EPS)

// Mean and 1 / sqrt(var + eps) of y [K] (biased variance, two passes).
IPL_HOST_DEVICE void ttt_ln_stats(const float* y, int K, float* mean, float* rstd) {
  float sum = 0.0f;
  for (int i = 0; i < K; ++i) sum += y[i];
  const float mu = sum / K;
  float var = 0.0f;
  for (int i = 0; i < K; ++i) var += (y[i] - mu) * (y[i] - mu);
  *mean = mu;
  *rstd = 1.0f / sqrtf(var / K + kTTTLnEps);
}

// Phase 4, feature j: the read-out of y [V] through the wrapper, LN(y)_j (+ q_j), with mu, r the statistics of y
// from `ttt_ln_stats` (unused without LN). Shared by the TTT-Linear, TTT-MLP and Titans steps.
IPL_HOST_DEVICE float ttt_readout_feature(const float* y, const float* q, const float* gamma, const float* beta,
                                          float mu, float r, int j, bool use_ln, bool use_residual) {
  const float z = use_ln ? (y[j] - mu) * r * gamma[j] + beta[j] : y[j];
  return use_residual ? z + q[j] : z;
}

// Phase 1: z[j] = sum_i k[i] W[i, j] (+ b[j]) for the columns [j0, j0 + TW) ∩ [0, d_out). W: [d_in, d_out]
// row-major (TTT-Linear: d_in = d_out = K; TTT-MLP's layers: K -> F and F -> K); b may be nullptr (no bias).
template <int TW>
IPL_HOST_DEVICE void ttt_linear_z_columns(const float* k, const float* W, const float* b, float* z, int d_in,
                                          int d_out, int j0) {
  const int width = d_out - j0 < TW ? d_out - j0 : TW;
  float acc[TW];  // [TW]
  for (int c = 0; c < width; ++c) acc[c] = b == nullptr ? 0.0f : b[j0 + c];
  for (int i = 0; i < d_in; ++i) {
    const float ki = k[i];
    const float* row = W + static_cast<long long>(i) * d_out + j0;  // [TW]
    for (int c = 0; c < width; ++c) acc[c] += ki * row[c];
  }
  for (int c = 0; c < width; ++c) z[j0 + c] = acc[c];
}

// Phase 2a (with LN), feature j: xhat = (z - mu) r and gx = gamma (LN(z) - t). Returns gx, writes xhat.
IPL_HOST_DEVICE float ttt_ln_residual(float z, float t, float gamma, float beta, float mu, float r, float* xhat) {
  const float xh = (z - mu) * r;
  *xhat = xh;
  return gamma * (xh * gamma + beta - t);
}

// Phase 2b (with LN), feature j: G = r (gx - mean(gx) - xhat mean(gx xhat)), the gradient at z through LN.
IPL_HOST_DEVICE float ttt_ln_grad(float gx, float xhat, float r, float mean_gx, float mean_gxx) {
  return r * (gx - mean_gx - xhat * mean_gxx);
}

// Mean of a [K] and of a * b [K] (the two reductions of phase 2b).
IPL_HOST_DEVICE void ttt_means(const float* a, const float* b, int K, float* mean_a, float* mean_ab) {
  float sa = 0.0f, sab = 0.0f;
  for (int i = 0; i < K; ++i) {
    sa += a[i];
    sab += a[i] * b[i];
  }
  *mean_a = sa / K;
  *mean_ab = sab / K;
}

// Phase 2 on one thread (the CPU ops; csrc/cuda/block_loss_grad.cuh is the block's twin): d = scale dl/dz of
// l = 1/2 ||LN(z) - t||^2, or d = scale (z - t) without LN, with t = v - k with the residual, else v. z, v, k,
// gamma, beta, d: [n]; xh [n] is scratch (the normalised z).
IPL_HOST_DEVICE void ttt_loss_grad(const float* z, const float* v, const float* k, const float* gamma,
                                   const float* beta, int n, bool use_ln, bool use_residual, float scale, float* d,
                                   float* xh) {
  if (use_ln) {
    float mu, r, mean_gx, mean_gxx;
    ttt_ln_stats(z, n, &mu, &r);
    for (int j = 0; j < n; ++j) {
      d[j] = ttt_ln_residual(z[j], use_residual ? v[j] - k[j] : v[j], gamma[j], beta[j], mu, r, &xh[j]);
    }
    ttt_means(d, xh, n, &mean_gx, &mean_gxx);
    for (int j = 0; j < n; ++j) d[j] = scale * ttt_ln_grad(d[j], xh[j], r, mean_gx, mean_gxx);
  } else {
    for (int j = 0; j < n; ++j) d[j] = scale * (z[j] - (use_residual ? v[j] - k[j] : v[j]));
  }
}

// Phase 3, columns [j0, j0 + TW) ∩ [0, d_out): S' = S + eta k^T G, x = q (W - s S') for those columns, and the
// new state: W_out = W - s S' and S_out = 0 when `commit`, else W_out = W and S_out = S'. W_in/W_out and
// S_in/S_out may alias (a column's entry is read before it is written, by one caller). q, k: [d_in];
// W, S: [d_in, d_out]; G: [d_out]; x: [d_out] (written).
template <int TW>
IPL_HOST_DEVICE void ttt_linear_update_columns(const float* q, const float* k, float eta, const float* G, float s,
                                               const float* W_in, const float* S_in, float* W_out, float* S_out,
                                               float* x, int d_in, int d_out, int j0, bool commit) {
  const int width = d_out - j0 < TW ? d_out - j0 : TW;
  float acc[TW];   // [TW] q (W - s S')
  float grad[TW];  // [TW] eta G
  for (int c = 0; c < width; ++c) {
    acc[c] = 0.0f;
    grad[c] = eta * G[j0 + c];
  }
  for (int i = 0; i < d_in; ++i) {
    const float ki = k[i], qi = q[i];
    const long long row = static_cast<long long>(i) * d_out + j0;
#ifndef __CUDACC__
#pragma GCC ivdep  // an output aliases at most its own input at the same index: the tile vectorizes
#endif
    for (int c = 0; c < width; ++c) {
      const float S = S_in[row + c] + ki * grad[c];
      const float Wn = W_in[row + c] - s * S;  // the weights in effect after this token
      acc[c] += qi * Wn;
      W_out[row + c] = commit ? Wn : W_in[row + c];
      S_out[row + c] = commit ? 0.0f : S;
    }
  }
  for (int c = 0; c < width; ++c) x[j0 + c] = acc[c];
}

// Phase 3 (with bias), feature j: sb' = sb + eta G, the bias in effect b - s sb' (returned), and the new state
// (committed or not, as the weights). b_in/b_out and sb_in/sb_out may alias.
IPL_HOST_DEVICE float ttt_linear_bias_feature(float G, float eta, float s, const float* b_in, const float* sb_in,
                                              float* b_out, float* sb_out, int j, bool commit) {
  const float b = b_in[j], sb = sb_in[j] + eta * G;
  const float bn = b - s * sb;
  b_out[j] = commit ? bn : b;
  sb_out[j] = commit ? 0.0f : sb;
  return bn;
}

}  // namespace ipl
