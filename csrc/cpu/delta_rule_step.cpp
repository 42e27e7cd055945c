// CPU delta-rule decoding step: checks, fp32 staging, and a parallel loop over (batch, head).
// Arithmetic: csrc/common/delta_rule_step.h.
#include <ATen/Parallel.h>

#include <math.h>

#include "common/delta_rule_step.h"
#include "cpu/checks.h"
#include "cpu/ops.h"

namespace ipl {
namespace {

constexpr int kTile = 16;  // columns per call of the shared tile function (fp32 accumulators in registers)
constexpr const char* kOp = "delta_rule_step";

}  // namespace

std::tuple<at::Tensor, at::Tensor> delta_rule_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& beta, const std::optional<at::Tensor>& g,
                                                   const at::Tensor& state, double scale, bool in_place) {
  check_float_cpu(kOp, "q", q, 3, {}, "B, H, K");
  check_float_cpu(kOp, "v", v, 3, {}, "B, H, V");
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  check_float_cpu(kOp, "k", k, 3, {B, H, K}, "B, H, K");
  check_float_cpu(kOp, "v", v, 3, {B, H, V}, "B, H, V");
  check_float_cpu(kOp, "beta", beta, 2, {B, H}, "B, H");
  check_float_cpu(kOp, "state", state, 4, {B, H, K, V}, "B, H, K, V");
  TORCH_CHECK_TYPE(state.scalar_type() == at::kFloat, kOp, ": state: expected float32, got ", state.scalar_type());
  at::Tensor g32;  // [B, H] fp32 log-decay, undefined without a gate
  if (g.has_value()) {
    check_float_cpu(kOp, "g", *g, 2, {B, H}, "B, H");
    g32 = g->to(at::kFloat).contiguous();
  }
  // fp32 contiguous copies (none when already so): the shared arithmetic reads raw fp32 rows
  const at::Tensor q32 = q.to(at::kFloat).contiguous(), k32 = k.to(at::kFloat).contiguous();
  const at::Tensor v32 = v.to(at::kFloat).contiguous(), b32 = beta.to(at::kFloat).contiguous();
  const at::Tensor s_in = state.contiguous();
  at::Tensor o = at::empty({B, H, V}, q.options().dtype(at::kFloat));         // [B, H, V]
  if (in_place) check_in_place(kOp, {{"state", state}});
  // in place the new state is written over the input (a column is read whole before any of it is written)
  at::Tensor s_out = in_place ? s_in : at::empty({B, H, K, V}, q.options().dtype(at::kFloat));  // [B, H, K, V]
  const float* qp = q32.data_ptr<float>();
  const float* kp = k32.data_ptr<float>();
  const float* vp = v32.data_ptr<float>();
  const float* bp = b32.data_ptr<float>();
  const float* gp = g32.defined() ? g32.data_ptr<float>() : nullptr;
  const float* sp = s_in.data_ptr<float>();
  float* op = o.data_ptr<float>();
  float* sop = s_out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int Ki = static_cast<int>(K), Vi = static_cast<int>(V);
  // one task per (batch, head): ATen's OpenMP pool, sized by torch.set_num_threads
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const float decay = gp ? expf(gp[bh]) : 1.0f;
      for (int j0 = 0; j0 < Vi; j0 += kTile) {
        delta_rule_step_columns<kTile>(qp + bh * K, kp + bh * K, vp + bh * V, bp[bh], decay, sp + bh * K * V,
                                       sop + bh * K * V, op + bh * V, Ki, Vi, j0, fscale);
      }
    }
  });
  return {o, s_out};
}

}  // namespace ipl
