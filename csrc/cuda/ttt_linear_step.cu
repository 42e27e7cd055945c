// CUDA TTT-Linear decoding step on raw fp32 pointers, sharing its arithmetic with the CPU op
// (csrc/common/ttt_linear_step.h). Not bound into ipl_layers._C here (CPU torch); nvcc compiles it alone in
// tests/csrc/test_cuda_compile.py for sm_80 and sm_90.
//
// Layout (contiguous): q, k, v, o [N, H, K]; eta [N, H]; ln_weight, ln_bias [H, K]; scale [H, C];
// W, sum_W [N, H, K, K] and b, sum_b [N, H, K], updated in place; position [N] int64, read only: the H blocks
// of a sequence share it, so the host advances it after the kernel (as kernels/ttt/linear_decode.py does).
#include <cuda_runtime.h>

#include "common/ttt_linear_step.h"
#include "cuda/block_loss_grad.cuh"

namespace ipl {

constexpr int kThreads = 64;

// Grid (N * H): one block per (sequence, head); thread c owns the columns j = c, c + kThreads, ... of W and
// sum_W in every phase, so its in-place updates never race. The [K] vectors between phases (z, xhat, G, x)
// live in shared memory (4 K floats, dynamic); every thread takes the LN statistics of a whole vector.
__global__ void __launch_bounds__(kThreads)
    ttt_linear_step_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                           const float* __restrict__ eta, const float* __restrict__ ln_weight,
                           const float* __restrict__ ln_bias, const float* __restrict__ scale,
                           const long long* __restrict__ position, float* W, float* b, float* sum_W, float* sum_b,
                           float* __restrict__ o, int H, int K, int C, bool use_ln, bool use_residual,
                           bool use_bias) {
  extern __shared__ float smem[];
  float *z = smem, *xh = z + K, *G = xh + K, *x = G + K;  // [K] each
  const long long nh = blockIdx.x;
  const int h = static_cast<int>(nh % H), tid = threadIdx.x;
  const long long p = position[nh / H];
  const float e = eta[nh], s = scale[h * C + p];
  const bool commit = p + 1 == C;
  const float *qv = q + nh * K, *kv = k + nh * K, *vv = v + nh * K, *gamma = ln_weight + h * K;
  const float* beta = ln_bias + h * K;
  float *Wm = W + nh * K * K, *Sm = sum_W + nh * K * K, *bv = b + nh * K, *sbv = sum_b + nh * K;
  for (int j = tid; j < K; j += kThreads) ttt_linear_z_columns<1>(kv, Wm, use_bias ? bv : nullptr, z, K, K, j);
  __syncthreads();
  block_loss_grad<kThreads>(z, vv, kv, gamma, beta, K, use_ln, use_residual, 1.0f, G, xh);
  for (int j = tid; j < K; j += kThreads) {  // G[j] is this thread's own entry: no barrier needed
    ttt_linear_update_columns<1>(qv, kv, e, G, s, Wm, Sm, Wm, Sm, x, K, K, j, commit);
    if (use_bias) x[j] += ttt_linear_bias_feature(G[j], e, s, bv, sbv, bv, sbv, j, commit);
  }
  __syncthreads();
  float mu = 0.0f, r = 1.0f;
  if (use_ln) ttt_ln_stats(x, K, &mu, &r);
  for (int j = tid; j < K; j += kThreads) {
    o[nh * K + j] = ttt_readout_feature(x, qv, gamma, beta, mu, r, j, use_ln, use_residual);
  }
}

cudaError_t launch_ttt_linear_step(const float* q, const float* k, const float* v, const float* eta,
                                   const float* ln_weight, const float* ln_bias, const float* scale,
                                   const long long* position, float* W, float* b, float* sum_W, float* sum_b,
                                   float* o, int N, int H, int K, int C, bool use_ln, bool use_residual,
                                   bool use_bias, cudaStream_t stream) {
  if (N * H == 0 || K == 0) return cudaSuccess;
  const size_t smem = 4 * static_cast<size_t>(K) * sizeof(float);
  ttt_linear_step_kernel<<<N * H, kThreads, smem, stream>>>(q, k, v, eta, ln_weight, ln_bias, scale, position, W,
                                                            b, sum_W, sum_b, o, H, K, C, use_ln, use_residual,
                                                            use_bias);
  return cudaGetLastError();
}

}  // namespace ipl
