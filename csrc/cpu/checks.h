// Input checks and fp32 staging shared by the CPU ops: an error names the op, the argument, the expected and the
// actual shape/dtype/device.
#pragma once

#include <string>

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

// A contiguous fp32 copy (none when x already is one): the shared arithmetic reads raw fp32 rows.
inline at::Tensor f32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

}  // namespace ipl
