// One decoding step of the Titans memory for one (sequence, head), on raw fp32 pointers (the torch twin is
// ipl_layers/ops/titans_chunk.py: step). The memory is an MLP of depth L, M(x) = gelu(..gelu(x W_1)..) W_L
// (exact GELU), layer l mapping d_l -> d_{l+1} features (d_0 = K, d_L = V). Per layer the state holds the open
// chunk's start weights G_l (where its tokens take their gradients), the momentum S_l and the weights M_l; for
// the token (q, k, v) with step size theta, momentum eta and forgetting alpha, t = v - k (v without residual):
//
//     keys through G:   x_0 = k,  z_l = x_l G_l,  x_{l+1} = gelu(z_l)
//     loss gradients:   d_{L-1} = d/dz ||LN(z_{L-1}) - t||^2 (2 (z - t) without LN),
//                       d_{l-1} = (d_l G_l^T) * gelu'(z_{l-1})
//     normalize_step:   theta /= 1 + 2 sum_l |x_l|^2 |d_l|^2 / |d_{L-1}|^2  (titans_step_scale)
//     update:           S_l = eta S_l - theta x_l^T d_l,   M_l = (1 - alpha) M_l + S_l
//     query through M:  h_0 = q,  h_{l+1} = a_l M_l with a_0 = h_0, a_l = gelu(h_l);  o = LN(h_L) (+ q)
//
// and when the chunk fills (position + 1 == C) its start weights become M: G_l' = M_l. The CPU op runs each
// matrix pass over tiles of columns (rows for the backward), sharing the LN arithmetic of TTT-Linear
// (common/ttt_linear_step.h; Titans' loss is the squared error, twice TTT's halved one).
#pragma once

#include <float.h>
#include <math.h>

#include "common/host_device.h"
#include "common/ttt_linear_step.h"

namespace ipl {

IPL_HOST_DEVICE float gelu_exact(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// d gelu / dx = Phi(x) + x phi(x).
IPL_HOST_DEVICE float gelu_exact_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
  return cdf + x * pdf;
}

// y[j] = sum_i x[i] W[i, j] for the columns [j0, j0 + TW) ∩ [0, d_out). W: [d_in, d_out] row-major.
template <int TW>
IPL_HOST_DEVICE void titans_matvec_columns(const float* x, const float* W, float* y, int d_in, int d_out, int j0) {
  const int width = d_out - j0 < TW ? d_out - j0 : TW;
  float acc[TW];  // [TW]
  for (int c = 0; c < width; ++c) acc[c] = 0.0f;
  for (int i = 0; i < d_in; ++i) {
    const float xi = x[i];
    const float* row = W + static_cast<long long>(i) * d_out + j0;  // [TW]
    for (int c = 0; c < width; ++c) acc[c] += xi * row[c];
  }
  for (int c = 0; c < width; ++c) y[j0 + c] = acc[c];
}

// The backward through layer l for input feature i: (sum_j d[j] G[i, j]) gelu'(z_prev[i]). G: [d_in, d_out].
IPL_HOST_DEVICE float titans_backprop_row(const float* d, const float* G, float z_prev, int d_out, int i) {
  const float* row = G + static_cast<long long>(i) * d_out;  // [d_out]
  float acc = 0.0f;
  for (int j = 0; j < d_out; ++j) acc += d[j] * row[j];
  return acc * gelu_exact_grad(z_prev);
}

// 1 / (1 + 2 rho), rho = sum_l |x_l|^2 |d_l|^2 / |d_{L-1}|^2: the factor `normalize_step` scales theta by (the
// curvature of the token's loss along its error; ipl_layers/ops/titans_memory.py). xs holds x_0 .. x_{L-1} and ds
// d_0 .. d_{L-1} back to back, layer l mapping dims[l] -> dims[l + 1]; rho is 0 where d_{L-1} is.
template <typename Int>
IPL_HOST_DEVICE float titans_step_scale(const float* xs, const float* ds, const Int* dims, int L) {
  float rho = 0.0f, last = 0.0f;
  for (int l = 0; l < L; ++l) {
    float xx = 0.0f, dd = 0.0f;
    for (Int i = 0; i < dims[l]; ++i) xx += xs[i] * xs[i];
    for (Int j = 0; j < dims[l + 1]; ++j) dd += ds[j] * ds[j];
    rho += xx * dd;
    last = dd;
    xs += dims[l];
    ds += dims[l + 1];
  }
  return 1.0f / (1.0f + 2.0f * rho / fmaxf(last, FLT_MIN));
}

// The update of one layer for the columns [j0, j0 + TW) ∩ [0, d_out): S = eta S - theta x^T d,
// M = (1 - alpha) M + S, G' = M when `full` (else G). Each *_in / *_out pair may alias (an entry is read before
// it is written, by one caller). x: [d_in]; d: [d_out]; G, S, M: [d_in, d_out].
template <int TW>
IPL_HOST_DEVICE void titans_update_columns(const float* x, const float* d, float theta, float eta, float alpha,
                                           const float* G_in, const float* S_in, const float* M_in, float* G_out,
                                           float* S_out, float* M_out, int d_in, int d_out, int j0, bool full) {
  const int width = d_out - j0 < TW ? d_out - j0 : TW;
  for (int i = 0; i < d_in; ++i) {
    const float txi = theta * x[i];
    const long long row = static_cast<long long>(i) * d_out + j0;
#ifndef __CUDACC__
#pragma GCC ivdep  // an output aliases at most its own input at the same index: the tile vectorizes
#endif
    for (int c = 0; c < width; ++c) {
      const float S = eta * S_in[row + c] - txi * d[j0 + c];
      const float M = (1.0f - alpha) * M_in[row + c] + S;
      G_out[row + c] = full ? M : G_in[row + c];
      S_out[row + c] = S;
      M_out[row + c] = M;
    }
  }
}

}  // namespace ipl
