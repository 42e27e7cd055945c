// One decoding step of the (gated) delta rule for one (batch, head), on raw fp32 pointers.
//
//     a = exp(g) (1 without a gate),   u = beta (v - k^T (a S)),   S' = a S + k u^T,   o = scale q S'
//
// S is [K, V] row-major. The CPU extension runs it on tiles of columns (vectorized by the compiler), the
// CUDA kernel one column per thread: the same code, so the CPU tests check the arithmetic the GPU runs.
#pragma once

#include "common/host_device.h"

namespace ipl {

// Updates columns [j0, j0 + W) ∩ [0, V) of the state and writes those entries of o. q, k: [K]; v: [V];
// s_in, s_out: [K, V] (they may alias: a column is read whole before any of it is written, by one caller).
template <int W>
IPL_HOST_DEVICE void delta_rule_step_columns(const float* q, const float* k, const float* v, float beta, float decay,
                                             const float* s_in, float* s_out, float* o, int K, int V, int j0,
                                             float scale) {
  const int width = V - j0 < W ? V - j0 : W;
  float err[W];  // [W] k^T S, then beta (v - a k^T S)
  float acc[W];  // [W] q S'
  for (int c = 0; c < width; ++c) {
    err[c] = 0.0f;
    acc[c] = 0.0f;
  }
  for (int i = 0; i < K; ++i) {
    const float ki = k[i];
    const float* row = s_in + static_cast<long long>(i) * V + j0;  // [W]
    for (int c = 0; c < width; ++c) err[c] += ki * row[c];
  }
  for (int c = 0; c < width; ++c) err[c] = beta * (v[j0 + c] - decay * err[c]);
  for (int i = 0; i < K; ++i) {
    const float ki = k[i], qi = q[i];
    const float* row_in = s_in + static_cast<long long>(i) * V + j0;  // [W]
    float* row_out = s_out + static_cast<long long>(i) * V + j0;      // [W]
    for (int c = 0; c < width; ++c) {
      const float s = decay * row_in[c] + ki * err[c];
      row_out[c] = s;
      acc[c] += qi * s;
    }
  }
  for (int c = 0; c < width; ++c) o[j0 + c] = scale * acc[c];
}

}  // namespace ipl
