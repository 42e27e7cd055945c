// CUDA short-conv decoding step on raw fp32 pointers, sharing its arithmetic with the CPU op
// (csrc/common/short_conv_step.h). Not bound into ipl_layers._C here (CPU torch); nvcc compiles it alone in
// tests/csrc/test_cuda_compile.py for sm_80 and sm_90.
//
// Layout (contiguous): x, y [B, D]; weight [D, W]; bias [D] (may be nullptr); h_in, h_out [B, D, W-1] (may be
// the same buffer: each thread reads its channel's entries before it writes them).
#include <cuda_runtime.h>

#include "common/short_conv_step.h"

namespace ipl {

constexpr int kThreads = 256;

// Grid (ceil(B * D / kThreads)): each thread owns one (sequence, channel); its W-1 state entries are
// contiguous, so the state is read once, in full cache lines across a warp.
__global__ void __launch_bounds__(kThreads)
    short_conv_step_kernel(const float* __restrict__ x, const float* __restrict__ weight,
                           const float* __restrict__ bias, const float* h_in, float* h_out, float* __restrict__ y,
                           long long BD, int D, int W, bool silu) {
  const long long bd = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (bd >= BD) return;
  const long long d = bd % D;
  y[bd] = short_conv_step_channel(x[bd], weight + d * W, bias == nullptr ? 0.0f : bias[d], h_in + bd * (W - 1),
                                  h_out + bd * (W - 1), W, silu);
}

cudaError_t launch_short_conv_step(const float* x, const float* weight, const float* bias, const float* h_in,
                                   float* h_out, float* y, int B, int D, int W, bool silu, cudaStream_t stream) {
  const long long BD = static_cast<long long>(B) * D;
  if (BD == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((BD + kThreads - 1) / kThreads);
  short_conv_step_kernel<<<blocks, kThreads, 0, stream>>>(x, weight, bias, h_in, h_out, y, BD, D, W, silu);
  return cudaGetLastError();
}

}  // namespace ipl
