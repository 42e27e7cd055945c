// Input checks and fp32 staging shared by the CPU ops: an error names the op, the argument, the expected and the
// actual shape/dtype/device.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

namespace ipl {

// x: a floating CPU tensor of `dim` dims ([dims] in the message) and, when `expected` is given, that shape.
inline void check_float_cpu(const char* op, const std::string& name, const at::Tensor& x, int64_t dim,
                            at::IntArrayRef expected, const char* dims) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got device ", x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": ", name,
                   ": expected a floating dtype (float16/bfloat16/float32/float64), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == dim, op, ": ", name, ": expected ", dim, "-D [", dims, "], got ", x.dim(),
                    "-D with shape ", x.sizes());
  if (!expected.empty()) {
    TORCH_CHECK_VALUE(x.sizes() == expected, op, ": ", name, ": expected shape [", dims, "] = ", expected, ", got ",
                      x.sizes());
  }
}

// position: int64 [N], each sequence's place in its open mini-batch (chunk), in [0, C). Returns it contiguous.
inline at::Tensor check_position(const char* op, const at::Tensor& position, int64_t N, int64_t C) {
  TORCH_CHECK_TYPE(position.scalar_type() == at::kLong, op, ": position: expected int64, got ",
                   position.scalar_type());
  TORCH_CHECK_VALUE(position.dim() == 1 && position.size(0) == N, op, ": position: expected shape [N] = [", N,
                    "], got ", position.sizes());
  at::Tensor pos = position.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(pp[n] >= 0 && pp[n] < C, op, ": position: expected values in [0, C = ", C, "), got ", pp[n],
                      " at sequence ", n);
  }
  return pos;
}

// in_place: the step writes the new state over these tensors, so each must be fp32 and contiguous (written where
// it is, not staged) and no two may share memory (a start aliasing the weights would take the weights' update).
inline void check_in_place(const char* op, const std::vector<std::pair<std::string, at::Tensor>>& state) {
  for (size_t i = 0; i < state.size(); ++i) {
    const auto& [name, x] = state[i];
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.is_contiguous(), op, ": ", name,
                      ": in_place needs a contiguous float32 tensor, got ", x.scalar_type(),
                      x.is_contiguous() ? " (contiguous)" : " (non-contiguous)");
    const char* lo = static_cast<const char*>(x.data_ptr());
    for (size_t j = 0; j < i; ++j) {
      const char* other = static_cast<const char*>(state[j].second.data_ptr());
      TORCH_CHECK_VALUE(lo + x.nbytes() <= other || other + state[j].second.nbytes() <= lo, op, ": ", name,
                        ": in_place needs state tensors that do not share memory, but it overlaps ", state[j].first);
    }
  }
}

// A contiguous fp32 copy (none when x already is one): the shared arithmetic reads raw fp32 rows.
inline at::Tensor f32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

}  // namespace ipl
