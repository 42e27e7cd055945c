// CPU short-conv decoding step: checks, fp32 staging, and a parallel loop over (sequence, channel).
// Arithmetic: csrc/common/short_conv_step.h.
#include <ATen/Parallel.h>

#include "common/short_conv_step.h"
#include "cpu/checks.h"
#include "cpu/ops.h"

namespace ipl {
namespace {

constexpr const char* kOp = "short_conv_step";
constexpr int64_t kGrain = 1024;  // channels per task: one channel is ~W fused multiply-adds, too little alone

}  // namespace

std::tuple<at::Tensor, at::Tensor> short_conv_step(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& state,
                                                   bool silu, bool in_place) {
  check_float_cpu(kOp, "x", x, 2, {}, "B, D");
  check_float_cpu(kOp, "weight", weight, 2, {}, "D, W");
  const int64_t B = x.size(0), D = x.size(1), W = weight.size(1);
  TORCH_CHECK_VALUE(weight.size(0) == D && W >= 1, kOp, ": weight: expected shape [D, W] with D = ", D,
                    " and W >= 1, got ", weight.sizes());
  check_float_cpu(kOp, "state", state, 3, {B, D, W - 1}, "B, D, W-1");
  at::Tensor bias32;  // [D] fp32, undefined without a bias
  if (bias.has_value()) {
    check_float_cpu(kOp, "bias", *bias, 1, {D}, "D");
    bias32 = bias->to(at::kFloat).contiguous();
  }
  // fp32 contiguous copies (none when already so): the shared arithmetic reads raw fp32 rows
  const at::Tensor x32 = x.to(at::kFloat).contiguous(), w32 = weight.to(at::kFloat).contiguous();
  const at::Tensor h_in = state.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({B, D}, x.options().dtype(at::kFloat));              // [B, D]
  if (in_place) check_in_place(kOp, {{"state", state}});
  // in place the new history is written over the input (each entry is read before it is written)
  at::Tensor h_out = in_place ? h_in : at::empty({B, D, W - 1}, x.options().dtype(at::kFloat));  // [B, D, W-1]
  const float* xp = x32.data_ptr<float>();
  const float* wp = w32.data_ptr<float>();
  const float* bp = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const float* hp = h_in.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* hop = h_out.data_ptr<float>();
  const int Wi = static_cast<int>(W);
  at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t bd = begin; bd < end; ++bd) {
      const int64_t d = bd % D;
      yp[bd] = short_conv_step_channel(xp[bd], wp + d * W, bp ? bp[d] : 0.0f, hp + bd * (W - 1),
                                       hop + bd * (W - 1), Wi, silu);
    }
  });
  return {y, h_out};
}

}  // namespace ipl
