// Per-row arithmetic of the weighted embedding bag, on raw fp32 pointers, shared by the CPU extension
// (csrc/cpu/embedding_bag.cpp) and the CUDA kernels (csrc/cuda/embedding_bag_bwd.cu), so the CPU tests check
// the arithmetic the GPU runs.
//
//     out[b, d]  = sum_j w[b, j] values[idx[b, j], d]                     (forward, one bag)
//     dw[b, j]   = sum_d dout[b, d] values[idx[b, j], d]                  (weights' gradient)
//     dval[r, d] = sum over entries e of row r, in their sorted order, of w[e] dout[e / n, d]   (table's)
//
// The table's gradient reads a reverse index (the flat (bag, slot) entries sorted stably by row): every row
// sums its own entries in one fixed order, so the result is deterministic and needs no atomics.
#pragma once

#include <stdint.h>

#include "common/host_device.h"

namespace ipl {

// out[d] for d in [d0, d0 + width) of one bag: idx, w [n]; values [N, D] row-major.
IPL_HOST_DEVICE void bag_forward_columns(const int64_t* idx, const float* w, const float* values, int n, int64_t D,
                                         int64_t d0, int64_t width, float* out) {
  for (int64_t c = 0; c < width; ++c) out[d0 + c] = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float wj = w[j];
    const float* row = values + idx[j] * D + d0;
    for (int64_t c = 0; c < width; ++c) out[d0 + c] += wj * row[c];
  }
}

// dval[d] for d in [d0, d0 + width) of one touched row: its `count` entries order[0..count) (flat (bag, slot)
// positions, sorted), w_flat [M * n], dout [M, D].
IPL_HOST_DEVICE void row_grad_columns(const int64_t* order, int64_t count, const float* w_flat, const float* dout,
                                      int n, int64_t D, int64_t d0, int64_t width, float* dval) {
  for (int64_t c = 0; c < width; ++c) dval[d0 + c] = 0.0f;
  for (int64_t e = 0; e < count; ++e) {
    const int64_t entry = order[e];
    const float we = w_flat[entry];
    const float* g = dout + (entry / n) * D + d0;
    for (int64_t c = 0; c < width; ++c) dval[d0 + c] += we * g[c];
  }
}

// Both gradients of one touched row in one pass over its `count` entries order[0..count) (flat (bag, slot)
// positions, sorted): dw_flat[entry] = <dout[entry / n], row> and dval = sum of w_flat[entry] dout[entry / n],
// so the row (the table read, random in N) is loaded once for all its entries while the dout rows it meets
// ([M, D], a few MB) stay in cache. The dot keeps 8 partial sums so that it vectorizes (a fixed order: the
// result does not depend on the thread count).
IPL_HOST_DEVICE void row_backward(const int64_t* order, int64_t count, const float* w_flat, const float* dout,
                                  const float* row, int n, int64_t D, float* dw_flat, float* dval) {
  for (int64_t d = 0; d < D; ++d) dval[d] = 0.0f;
  for (int64_t e = 0; e < count; ++e) {
    const int64_t entry = order[e];
    const float we = w_flat[entry];
    const float* g = dout + (entry / n) * D;
    float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      for (int l = 0; l < 8; ++l) {
        lanes[l] += g[d + l] * row[d + l];
        dval[d + l] += we * g[d + l];
      }
    }
    float acc = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; d < D; ++d) {
      acc += g[d] * row[d];
      dval[d] += we * g[d];
    }
    dw_flat[entry] = acc;
  }
}

}  // namespace ipl
