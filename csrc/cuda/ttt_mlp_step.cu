// CUDA TTT-MLP decoding step on raw fp32 pointers, sharing its arithmetic with the CPU op
// (csrc/common/ttt_mlp_step.h). Not bound into ipl_layers._C here (CPU torch); nvcc compiles it alone in
// tests/csrc/test_cuda_compile.py for sm_80 and sm_90.
//
// Layout (contiguous): q, k, v, o [N, H, K]; eta [N, H]; ln_weight, ln_bias [H, K]; scale [H, C]; the state
// (`TTTMLPTensors`) W1, sum_W1 [N, H, K, F], b1, sum_b1 [N, H, F], W2, sum_W2 [N, H, F, K], b2, sum_b2 [N, H, K],
// updated in place; position [N] int64, read only: the H blocks of a sequence share it, so the host advances it
// after the kernel (as for TTT-Linear).
#include <cuda_runtime.h>

#include "common/ttt_mlp_step.h"
#include "cuda/block_loss_grad.cuh"

namespace ipl {

constexpr int kThreads = 128;  // F = 4 K = 256 at K = 64: two hidden columns per thread

struct TTTMLPTensors {
  float *W1, *b1, *W2, *b2, *sum_W1, *sum_b1, *sum_W2, *sum_b2;
};

// Grid (N * H): one block per (sequence, head). Thread c owns the hidden units f = c, c + kThreads, ... (columns
// of W1, sum_W1 and rows of W2 read for G1) and the features j = c, ... (columns of W2, sum_W2), so the in-place
// updates never race; a barrier separates the phases of common/ttt_mlp_step.h. The vectors between phases live
// in shared memory (dynamic, 3 F + 4 K floats): a, G1, h [F] and z2, xh, G2, x2 [K].
__global__ void __launch_bounds__(kThreads)
    ttt_mlp_step_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                        const float* __restrict__ eta, const float* __restrict__ ln_weight,
                        const float* __restrict__ ln_bias, const float* __restrict__ scale,
                        const long long* __restrict__ position, TTTMLPTensors st, float* __restrict__ o, int H, int K,
                        int F, int C, bool use_ln, bool use_residual) {
  extern __shared__ float smem[];
  float *a = smem, *G1 = a + F, *hq = G1 + F, *z2 = hq + F, *xh = z2 + K, *G2 = xh + K, *x2 = G2 + K;
  const long long nh = blockIdx.x;
  const int h = static_cast<int>(nh % H), tid = threadIdx.x;
  const long long p = position[nh / H];
  const float e = eta[nh], s = scale[h * C + p];
  const bool commit = p + 1 == C;
  const float *qv = q + nh * K, *kv = k + nh * K, *vv = v + nh * K, *gamma = ln_weight + h * K;
  const float* beta = ln_bias + h * K;
  float *W1 = st.W1 + nh * K * F, *S1 = st.sum_W1 + nh * K * F, *b1 = st.b1 + nh * F, *sb1 = st.sum_b1 + nh * F;
  float *W2 = st.W2 + nh * F * K, *S2 = st.sum_W2 + nh * F * K, *b2 = st.b2 + nh * K, *sb2 = st.sum_b2 + nh * K;
  for (int f = tid; f < F; f += kThreads) {  // G1 holds gelu'(z1) until phase 4
    ttt_linear_z_columns<1>(kv, W1, b1, a, K, F, f);
    a[f] = gelu_tanh_and_slope(a[f], &G1[f]);
  }
  __syncthreads();
  for (int j = tid; j < K; j += kThreads) ttt_linear_z_columns<1>(a, W2, b2, z2, F, K, j);
  __syncthreads();
  block_loss_grad<kThreads>(z2, vv, kv, gamma, beta, K, use_ln, use_residual, 1.0f, G2, xh);
  __syncthreads();
  for (int f = tid; f < F; f += kThreads) {  // G1[f] is this thread's own entry: no barrier before the update
    G1[f] = ttt_mlp_hidden_grad(G2, W2, G1[f], K, f);
    ttt_linear_update_columns<1>(qv, kv, e, G1, s, W1, S1, W1, S1, hq, K, F, f, commit);
    hq[f] = gelu_tanh(hq[f] + ttt_linear_bias_feature(G1[f], e, s, b1, sb1, b1, sb1, f, commit));
  }
  __syncthreads();  // h is complete, and every row of the start W2 has been read before its columns change
  for (int j = tid; j < K; j += kThreads) {
    ttt_linear_update_columns<1>(hq, a, e, G2, s, W2, S2, W2, S2, x2, F, K, j, commit);
    x2[j] += ttt_linear_bias_feature(G2[j], e, s, b2, sb2, b2, sb2, j, commit);
  }
  __syncthreads();
  float mu = 0.0f, r = 1.0f;
  if (use_ln) ttt_ln_stats(x2, K, &mu, &r);
  for (int j = tid; j < K; j += kThreads) {
    o[nh * K + j] = ttt_readout_feature(x2, qv, gamma, beta, mu, r, j, use_ln, use_residual);
  }
}

cudaError_t launch_ttt_mlp_step(const float* q, const float* k, const float* v, const float* eta,
                                const float* ln_weight, const float* ln_bias, const float* scale,
                                const long long* position, const TTTMLPTensors& state, float* o, int N, int H, int K,
                                int F, int C, bool use_ln, bool use_residual, cudaStream_t stream) {
  if (N * H == 0 || K == 0) return cudaSuccess;
  const size_t smem = (3 * static_cast<size_t>(F) + 4 * static_cast<size_t>(K)) * sizeof(float);
  if (smem > 48 * 1024) {  // past the default dynamic limit (K = 64, F = 256 needs 4 KiB): opt in, up to the arch's
    const cudaError_t err = cudaFuncSetAttribute(ttt_mlp_step_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  ttt_mlp_step_kernel<<<N * H, kThreads, smem, stream>>>(q, k, v, eta, ln_weight, ln_bias, scale, position, state,
                                                         o, H, K, F, C, use_ln, use_residual);
  return cudaGetLastError();
}

}  // namespace ipl
