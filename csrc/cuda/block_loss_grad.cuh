// The reconstruction loss's gradient at a fast weight's output, for the CUDA decode steps of TTT-Linear, TTT-MLP and
// Titans (one block per (sequence, head)): with the LN wrapper d = scale * dLN(z)^T (gamma LN(z) + beta - t), without it
// d = scale * (z - t), the target t = v - k with the residual, else v: the block's twin of the CPU ops'
// `ttt_loss_grad` (csrc/common/ttt_linear_step.h), on the same per-element functions.
#pragma once

#include "common/ttt_linear_step.h"

namespace ipl {

// z, d, xh: [n] in shared memory, z complete before the call (the caller's barrier); d is this block's result, xh
// the normalised z as scratch. Thread tid owns entries tid, tid + kThreads, ...; the caller syncs before reading d.
template <int kThreads>
__device__ void block_loss_grad(const float* z, const float* vv, const float* kv, const float* gamma,
                                const float* beta, int n, bool use_ln, bool use_residual, float scale, float* d,
                                float* xh) {
  const int tid = threadIdx.x;
  if (use_ln) {
    float mu, r, mean_gx, mean_gxx;
    ttt_ln_stats(z, n, &mu, &r);
    for (int j = tid; j < n; j += kThreads) {
      d[j] = ttt_ln_residual(z[j], use_residual ? vv[j] - kv[j] : vv[j], gamma[j], beta[j], mu, r, &xh[j]);
    }
    __syncthreads();
    ttt_means(d, xh, n, &mean_gx, &mean_gxx);
    __syncthreads();  // every thread has read all of d before any overwrites its entries
    for (int j = tid; j < n; j += kThreads) d[j] = scale * ttt_ln_grad(d[j], xh[j], r, mean_gx, mean_gxx);
  } else {
    for (int j = tid; j < n; j += kThreads) d[j] = scale * (z[j] - (use_residual ? vv[j] - kv[j] : vv[j]));
  }
}

}  // namespace ipl
