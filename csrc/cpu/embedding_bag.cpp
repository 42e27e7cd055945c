// CPU weighted embedding bag, forward and backward: checks, fp32 staging, parallel loops over bags (forward)
// and over touched rows (both gradients, deterministic for any thread count: each
// row is summed by one task in the reverse index's order). Arithmetic: csrc/common/embedding_bag.h.
#include <ATen/Parallel.h>

#include "common/embedding_bag.h"
#include "cpu/ops.h"

namespace ipl {
namespace {

void check_cpu(const char* op, const char* name, const at::Tensor& x, int64_t dim, bool floating) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() == dim, op, ": ", name, ": expected ", dim, "-D, got ", x.dim(), "-D with shape ",
                    x.sizes());
  if (floating) {
    TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": ", name, ": expected a floating dtype, got ",
                     x.scalar_type());
  } else {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kLong, op, ": ", name, ": expected int64, got ", x.scalar_type());
  }
}

}  // namespace

at::Tensor embedding_bag_forward(const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& values) {
  const char* op = "embedding_bag_forward";
  check_cpu(op, "indices", indices, 2, false);
  check_cpu(op, "weights", weights, 2, true);
  check_cpu(op, "values", values, 2, true);
  TORCH_CHECK_VALUE(weights.sizes() == indices.sizes(), op, ": weights: expected the shape of indices ",
                    indices.sizes(), ", got ", weights.sizes());
  const int64_t M = indices.size(0), n = indices.size(1), D = values.size(1);
  const at::Tensor idx = indices.contiguous(), w = weights.to(at::kFloat).contiguous();
  const at::Tensor val = values.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, D}, values.options().dtype(at::kFloat));  // [M, D]
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  const float* vp = val.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      bag_forward_columns(ip + b * n, wp + b * n, vp, static_cast<int>(n), D, 0, D, op_ + b * D);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_backward(const at::Tensor& indices, const at::Tensor& weights,
                                                          const at::Tensor& values, const at::Tensor& dout,
                                                          const at::Tensor& order, const at::Tensor& offsets) {
  const char* op = "embedding_bag_backward";
  check_cpu(op, "indices", indices, 2, false);
  check_cpu(op, "weights", weights, 2, true);
  check_cpu(op, "values", values, 2, true);
  check_cpu(op, "dout", dout, 2, true);
  check_cpu(op, "order", order, 1, false);
  check_cpu(op, "offsets", offsets, 1, false);
  const int64_t M = indices.size(0), n = indices.size(1), D = values.size(1), U = offsets.size(0);
  TORCH_CHECK_VALUE(dout.size(0) == M && dout.size(1) == D, op, ": dout: expected [M, D] = [", M, ", ", D,
                    "], got ", dout.sizes());
  TORCH_CHECK_VALUE(order.size(0) == M * n, op, ": order: expected M * n = ", M * n, " entries, got ",
                    order.size(0));
  const at::Tensor idx = indices.contiguous(), w = weights.to(at::kFloat).contiguous();
  const at::Tensor val = values.to(at::kFloat).contiguous(), g = dout.to(at::kFloat).contiguous();
  const at::Tensor ord = order.contiguous(), off = offsets.contiguous();
  at::Tensor dw = at::empty({M, n}, values.options().dtype(at::kFloat));    // [M, n]
  at::Tensor drows = at::empty({U, D}, values.options().dtype(at::kFloat)); // [U, D]: the touched rows in order
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  const float* vp = val.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const int64_t* orp = ord.data_ptr<int64_t>();
  const int64_t* ofp = off.data_ptr<int64_t>();
  float* dwp = dw.data_ptr<float>();
  float* drp = drows.data_ptr<float>();
  const int64_t total = M * n;
  // by touched row (rows ascending): each task owns its rows' entries, so both outputs are written once
  at::parallel_for(0, U, 16, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t start = ofp[u], stop = u + 1 < U ? ofp[u + 1] : total;
      row_backward(orp + start, stop - start, wp, gp, vp + ip[orp[start]] * D, static_cast<int>(n), D, dwp,
                   drp + u * D);
    }
  });
  return {dw, drows};
}

}  // namespace ipl
