// CUDA delta-rule decoding step on raw fp32 pointers, sharing its arithmetic with the CPU op
// (csrc/common/delta_rule_step.h). Not bound into ipl_layers._C here (CPU torch); nvcc compiles it alone in
// tests/csrc/test_cuda_compile.py for sm_80 and sm_90.
//
// Layout (contiguous): q, k [B, H, K]; v, o [B, H, V]; beta, g [B, H] (g may be nullptr: no gate);
// s_in, s_out [B, H, K, V] (may be the same buffer: each thread reads its column before it writes it).
#include <cuda_runtime.h>

#include "common/delta_rule_step.h"

namespace ipl {

constexpr int kThreads = 128;

// Grid (ceil(V / kThreads), B * H): each thread owns one value column j of one (batch, head) and walks the K
// rows twice (k^T S, then the update), so a warp reads 32 consecutive floats of a state row per step.
__global__ void __launch_bounds__(kThreads)
    delta_rule_step_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                           const float* __restrict__ beta, const float* __restrict__ g, const float* s_in,
                           float* s_out, float* __restrict__ o, int K, int V, float scale) {
  const long long bh = blockIdx.y;
  const int j = blockIdx.x * kThreads + threadIdx.x;
  if (j >= V) return;
  const float decay = g == nullptr ? 1.0f : expf(g[bh]);
  delta_rule_step_columns<1>(q + bh * K, k + bh * K, v + bh * V, beta[bh], decay, s_in + bh * K * V,
                             s_out + bh * K * V, o + bh * V, K, V, j, scale);
}

cudaError_t launch_delta_rule_step(const float* q, const float* k, const float* v, const float* beta, const float* g,
                                   const float* s_in, float* s_out, float* o, int B, int H, int K, int V, float scale,
                                   cudaStream_t stream) {
  if (B * H == 0 || V == 0) return cudaSuccess;
  const dim3 grid((V + kThreads - 1) / kThreads, B * H);
  delta_rule_step_kernel<<<grid, kThreads, 0, stream>>>(q, k, v, beta, g, s_in, s_out, o, K, V, scale);
  return cudaGetLastError();
}

}  // namespace ipl
