// CUDA backward of the weighted embedding bag on raw fp32 pointers, sharing its per-row arithmetic with the CPU
// extension (csrc/common/embedding_bag.h). Not bound into ipl_layers._C here (CPU torch); nvcc compiles it
// alone in tests/csrc/test_cuda_compile.py for sm_80 and sm_90.
//
// Layout (contiguous): indices [M, n] int64; w [M, n]; values [N, D]; dout [M, D]; the reverse index order
// [M * n] (flat entries sorted stably by row) and offsets [U] (each touched row's first entry); outputs
// dw [M, n] and drows [U, D] (the touched rows' gradients). No atomics: every output element has one writer
// that sums its terms in a fixed order, so the result is deterministic.
#include <cuda_runtime.h>

#include "common/embedding_bag.h"

namespace ipl {

constexpr int kColumns = 128;  // threads per block of the table's gradient: one column each
constexpr int kWarps = 4;      // warps per block of the weights' gradient: one (bag, slot) each

// Grid (ceil(D / kColumns), U): thread (u, d) sums row u's entries for column d; a warp reads 32 consecutive
// floats of each dout row (coalesced).
__global__ void __launch_bounds__(kColumns)
    embedding_bag_row_grad_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                  const float* __restrict__ w, const float* __restrict__ dout,
                                  float* __restrict__ drows, int n, int64_t D, int64_t U, int64_t total) {
  const int64_t u = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  if (d >= D) return;
  const int64_t start = offsets[u], stop = u + 1 < U ? offsets[u + 1] : total;
  row_grad_columns(order + start, stop - start, w, dout, n, D, d, 1, drows + u * D);
}

// Grid ceil(M * n / kWarps): each warp owns one (bag, slot) entry and reduces <dout_b, values[idx]> over D
// with its lanes striding the columns, then a shuffle tree.
__global__ void __launch_bounds__(kWarps * 32)
    embedding_bag_weight_grad_kernel(const int64_t* __restrict__ indices, const float* __restrict__ values,
                                     const float* __restrict__ dout, float* __restrict__ dw, int n, int64_t D,
                                     int64_t total) {
  const int64_t entry = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (entry >= total) return;
  const float* g = dout + (entry / n) * D;
  const float* row = values + indices[entry] * D;
  float acc = 0.0f;
  for (int64_t d = lane; d < D; d += 32) acc += g[d] * row[d];
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) dw[entry] = acc;
}

cudaError_t launch_embedding_bag_backward(const int64_t* indices, const float* w, const float* values,
                                          const float* dout, const int64_t* order, const int64_t* offsets,
                                          float* dw, float* drows, int64_t M, int n, int64_t D, int64_t U,
                                          cudaStream_t stream) {
  const int64_t total = M * n;
  if (total > 0) {
    embedding_bag_weight_grad_kernel<<<(total + kWarps - 1) / kWarps, kWarps * 32, 0, stream>>>(
        indices, values, dout, dw, n, D, total);
  }
  if (U > 0 && D > 0) {
    const dim3 grid((D + kColumns - 1) / kColumns, U);
    embedding_bag_row_grad_kernel<<<grid, kColumns, 0, stream>>>(order, offsets, w, dout, drows, n, D, U, total);
  }
  return cudaGetLastError();
}

}  // namespace ipl
