// One decoding step of linear attention for one (batch, head), on raw fp32 pointers.
//
//     S' = D S + k^T v,        o = scale * q S'
//
//     D = I                 kind == DecayKind::none
//     D = exp(g[0]) I       kind == DecayKind::scalar    g: [1] log-decay
//     D = diag(exp(g))      kind == DecayKind::per_key   g: [K] log-decay, scaling the rows of S
//
// The same code runs in the CPU extension (tiles of columns, vectorized by the compiler) and in the
// CUDA kernel (one column per thread), so the CPU tests check the arithmetic the GPU runs.
#pragma once

#include <math.h>

#include "common/host_device.h"

namespace ipl {

enum class DecayKind : int { none = 0, scalar = 1, per_key = 2 };

// Decay factor of state row i (key channel i).
IPL_HOST_DEVICE float row_decay(const float* g, DecayKind kind, int i) {
  switch (kind) {
    case DecayKind::scalar:
      return expf(g[0]);
    case DecayKind::per_key:
      return expf(g[i]);
    default:
      return 1.0f;
  }
}

// Updates columns [j0, j0 + W) ∩ [0, V) of the state and writes those entries of o.
// q, k: [K]; v: [V]; g: see above (unused for DecayKind::none); s_in, s_out: [K, V] row-major (they
// may alias: every entry is read before it is written, by the same caller); o: [V].
template <int W>
IPL_HOST_DEVICE void linear_attn_step_columns(const float* q, const float* k, const float* v, const float* g,
                                              DecayKind kind, const float* s_in, float* s_out, float* o, int K,
                                              int V, int j0, float scale) {
  const int width = V - j0 < W ? V - j0 : W;
  float acc[W];  // [W] partial q S' of the tile's columns
  float vj[W];   // [W]
  for (int c = 0; c < width; ++c) {
    acc[c] = 0.0f;
    vj[c] = v[j0 + c];
  }
  for (int i = 0; i < K; ++i) {
    const float d = row_decay(g, kind, i), ki = k[i], qi = q[i];
    const float* row_in = s_in + static_cast<long long>(i) * V + j0;  // [W]
    float* row_out = s_out + static_cast<long long>(i) * V + j0;      // [W]
    for (int c = 0; c < width; ++c) {
      const float s = d * row_in[c] + ki * vj[c];
      row_out[c] = s;
      acc[c] += qi * s;
    }
  }
  for (int c = 0; c < width; ++c) o[j0 + c] = scale * acc[c];
}

}  // namespace ipl
