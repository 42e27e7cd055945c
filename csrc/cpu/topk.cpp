// CPU top-k of the last dim of a float32 matrix, for small k: the product-key search takes the 32 best of a few
// hundred sub-key scores per (token, head, half) and of ~k ln k candidates, millions of short rows where
// torch.topk's general selection costs more per row than the scan below. Each row keeps its k best so far sorted
// descending: a new value enters only when it beats the k-th (most are rejected by one comparison once the first
// hundred are seen), then moves up by insertion. Ties keep the earlier index first.
#include <ATen/Parallel.h>

#include "cpu/ops.h"

namespace ipl {
namespace {

void topk_row(const float* x, int64_t n, int64_t k, float* vals, int64_t* idx) {
  int64_t filled = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    int64_t pos;
    if (filled == k) {
      if (!(v > vals[k - 1])) continue;
      pos = k - 1;
    } else {
      pos = filled++;
    }
    for (; pos > 0 && vals[pos - 1] < v; --pos) {
      vals[pos] = vals[pos - 1];
      idx[pos] = idx[pos - 1];
    }
    vals[pos] = v;
    idx[pos] = i;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& x, int64_t k) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "topk_rows: x: expected a CPU tensor, got device ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "topk_rows: x: expected float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "topk_rows: x: expected 2-D [R, n], got ", x.dim(), "-D with shape ", x.sizes());
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= n, "topk_rows: k: expected 1 <= k <= n = ", n, ", got ", k);
  const at::Tensor xc = x.contiguous();
  at::Tensor vals = at::empty({R, k}, x.options());                     // [R, k] descending
  at::Tensor idx = at::empty({R, k}, x.options().dtype(at::kLong));     // [R, k]
  const float* xp = xc.data_ptr<float>();
  float* vp = vals.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, R, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) topk_row(xp + r * n, n, k, vp + r * k, ip + r * k);
  });
  return {vals, idx};
}

}  // namespace ipl
