// CUDA Titans-memory decoding step on raw fp32 pointers, sharing its arithmetic with the CPU op
// (csrc/common/titans_step.h). Not bound into ipl_layers._C here (CPU torch); nvcc compiles it alone in
// tests/csrc/test_cuda_compile.py for sm_80 and sm_90.
//
// Layout (contiguous): q, k [N, H, K]; v, o [N, H, V] (V == K with the residual); theta, eta, alpha [N, H];
// ln_weight, ln_bias [H, V]; per layer l < depth <= kMaxDepth, start/momentum/weights [N, H, d_l, d_{l+1}]
// updated in place; position [N] int64, read only: the host advances it after the kernel.
#include <cuda_runtime.h>

#include "common/titans_step.h"
#include "cuda/block_loss_grad.cuh"

namespace ipl {

constexpr int kThreads = 128;
constexpr int kMaxDepth = 4;

struct TitansLayers {
  int depth;
  int dims[kMaxDepth + 1];  // d_0 = K .. d_L = V
  float* start[kMaxDepth];
  float* momentum[kMaxDepth];
  float* weights[kMaxDepth];
};

// Grid (N * H): one block per (sequence, head); thread c owns the columns j = c, c + kThreads, ... of every
// matrix and the rows i = c, ... of the backward, with a barrier between phases. The vectors between phases
// live in shared memory (dynamic, `titans_smem_floats`): x_l, z_l, d_l of every layer, the LN's xhat [V] and
// two query vectors of the widest layer.
__global__ void __launch_bounds__(kThreads)
    titans_step_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                       const float* __restrict__ theta, const float* __restrict__ eta,
                       const float* __restrict__ alpha, const float* __restrict__ ln_weight,
                       const float* __restrict__ ln_bias, const long long* __restrict__ position, TitansLayers net,
                       float* __restrict__ o, int H, int C, bool use_ln, bool use_residual, bool normalize_step) {
  extern __shared__ float smem[];
  const long long nh = blockIdx.x;
  const int h = static_cast<int>(nh % H), tid = threadIdx.x, L = net.depth, K = net.dims[0], V = net.dims[L];
  int x_off[kMaxDepth + 1], z_off[kMaxDepth + 1], widest = K;
  x_off[0] = z_off[0] = 0;
  for (int l = 0; l < L; ++l) {
    x_off[l + 1] = x_off[l] + net.dims[l];
    z_off[l + 1] = z_off[l] + net.dims[l + 1];
    widest = net.dims[l + 1] > widest ? net.dims[l + 1] : widest;
  }
  float *xs = smem, *zs = xs + x_off[L], *ds = zs + z_off[L], *xh = ds + z_off[L], *a = xh + V, *hq = a + widest;
  const bool full = position[nh / H] + 1 == C;
  const float *qv = q + nh * K, *kv = k + nh * K, *vv = v + nh * V, *gamma = ln_weight + h * V;
  const float* beta = ln_bias + h * V;
  auto mat = [&](float* const* t, int l) { return t[l] + nh * net.dims[l] * net.dims[l + 1]; };
  for (int j = tid; j < K; j += kThreads) xs[j] = kv[j];
  __syncthreads();
  for (int l = 0; l < L; ++l) {  // the keys through the start weights
    const int di = net.dims[l], dout = net.dims[l + 1];
    for (int j = tid; j < dout; j += kThreads) {
      titans_matvec_columns<1>(xs + x_off[l], mat(net.start, l), zs + z_off[l], di, dout, j);
      if (l + 1 < L) xs[x_off[l + 1] + j] = gelu_exact(zs[z_off[l] + j]);
    }
    __syncthreads();
  }
  const float* z_last = zs + z_off[L - 1];
  float* d_last = ds + z_off[L - 1];
  // twice TTT's gradient: Titans' loss is ||LN(z) - t||^2, not half of it
  block_loss_grad<kThreads>(z_last, vv, kv, gamma, beta, V, use_ln, use_residual, 2.0f, d_last, xh);
  __syncthreads();
  for (int l = L - 1; l > 0; --l) {  // back through the start weights
    const int di = net.dims[l], dout = net.dims[l + 1];
    for (int i = tid; i < di; i += kThreads) {
      ds[z_off[l - 1] + i] = titans_backprop_row(ds + z_off[l], mat(net.start, l), zs[z_off[l - 1] + i], dout, i);
    }
    __syncthreads();
  }
  // every thread computes the same scale from shared memory (a few hundred flops: no reduction, no barrier)
  const float th = normalize_step ? theta[nh] * titans_step_scale(xs, ds, net.dims, L) : theta[nh];
  for (int l = 0; l < L; ++l) {  // in place: every backward read of the start weights is done
    const int di = net.dims[l], dout = net.dims[l + 1];
    float *G = mat(net.start, l), *S = mat(net.momentum, l), *M = mat(net.weights, l);
    for (int j = tid; j < dout; j += kThreads) {
      titans_update_columns<1>(xs + x_off[l], ds + z_off[l], th, eta[nh], alpha[nh], G, S, M, G, S, M, di,
                               dout, j, full);
    }
  }
  __syncthreads();
  for (int j = tid; j < K; j += kThreads) a[j] = qv[j];
  __syncthreads();
  for (int l = 0; l < L; ++l) {  // the query through the new weights
    const int di = net.dims[l], dout = net.dims[l + 1];
    for (int j = tid; j < dout; j += kThreads) titans_matvec_columns<1>(a, mat(net.weights, l), hq, di, dout, j);
    __syncthreads();
    if (l + 1 < L) {
      for (int j = tid; j < dout; j += kThreads) a[j] = gelu_exact(hq[j]);
      __syncthreads();
    }
  }
  float mu = 0.0f, r = 1.0f;
  if (use_ln) ttt_ln_stats(hq, V, &mu, &r);
  for (int j = tid; j < V; j += kThreads) {
    o[nh * V + j] = ttt_readout_feature(hq, qv, gamma, beta, mu, r, j, use_ln, use_residual);
  }
}

// Floats of shared memory per block for these layer widths.
inline size_t titans_smem_floats(const TitansLayers& net) {
  size_t total = 0, widest = net.dims[0];
  for (int l = 0; l < net.depth; ++l) {
    total += net.dims[l] + 2 * static_cast<size_t>(net.dims[l + 1]);
    widest = net.dims[l + 1] > static_cast<int>(widest) ? net.dims[l + 1] : widest;
  }
  return total + net.dims[net.depth] + 2 * widest;
}

cudaError_t launch_titans_step(const float* q, const float* k, const float* v, const float* theta, const float* eta,
                               const float* alpha, const float* ln_weight, const float* ln_bias,
                               const long long* position, const TitansLayers& net, float* o, int N, int H, int C,
                               bool use_ln, bool use_residual, bool normalize_step, cudaStream_t stream) {
  if (net.depth < 1 || net.depth > kMaxDepth) return cudaErrorInvalidValue;
  if (N * H == 0) return cudaSuccess;
  const size_t smem = titans_smem_floats(net) * sizeof(float);
  titans_step_kernel<<<N * H, kThreads, smem, stream>>>(q, k, v, theta, eta, alpha, ln_weight, ln_bias, position,
                                                        net, o, H, C, use_ln, use_residual, normalize_step);
  return cudaGetLastError();
}

}  // namespace ipl
