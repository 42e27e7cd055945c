// CPU linear-attention decoding step: checks, fp32 staging, and a parallel loop over (batch, head).
#include <ATen/Parallel.h>

#include "common/linear_attn_step.h"
#include "cpu/checks.h"
#include "cpu/ops.h"

namespace ipl {
namespace {

// Columns per call of the shared tile function: 16 fp32 accumulators stay in vector registers.
constexpr int kTile = 16;

void check_float_cpu(const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "linear_attention_step: ", name, ": expected a CPU tensor, got device ",
                    x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "linear_attention_step: ", name,
                   ": expected a floating dtype (float16/bfloat16/float32/float64), got ", x.scalar_type());
}

void check_shape(const char* name, const at::Tensor& x, at::IntArrayRef expected, const char* dims) {
  TORCH_CHECK_VALUE(x.sizes() == expected, "linear_attention_step: ", name, ": expected shape [", dims, "] = ",
                    expected, ", got ", x.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_attention_step(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const std::optional<at::Tensor>& g,
                                                         const at::Tensor& state, double scale, bool in_place) {
  check_float_cpu("q", q);
  check_float_cpu("k", k);
  check_float_cpu("v", v);
  check_float_cpu("state", state);
  TORCH_CHECK_VALUE(q.dim() == 3, "linear_attention_step: q: expected 3-D [B, H, K], got ", q.dim(),
                    "-D with shape ", q.sizes());
  TORCH_CHECK_VALUE(v.dim() == 3, "linear_attention_step: v: expected 3-D [B, H, V], got ", v.dim(),
                    "-D with shape ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  check_shape("k", k, {B, H, K}, "B, H, K");
  check_shape("v", v, {B, H, V}, "B, H, V");
  check_shape("state", state, {B, H, K, V}, "B, H, K, V");
  TORCH_CHECK_TYPE(state.scalar_type() == at::kFloat, "linear_attention_step: state: expected float32, got ",
                   state.scalar_type());

  DecayKind kind = DecayKind::none;
  at::Tensor g32;  // [B, H] or [B, H, K] fp32, undefined without decay
  if (g.has_value()) {
    check_float_cpu("g", *g);
    TORCH_CHECK_VALUE(g->dim() == 2 || g->dim() == 3,
                      "linear_attention_step: g: expected [B, H] (scalar decay) or [B, H, K] (per-key decay), got ",
                      g->dim(), "-D with shape ", g->sizes());
    if (g->dim() == 2) {
      check_shape("g", *g, {B, H}, "B, H");
      kind = DecayKind::scalar;
    } else {
      check_shape("g", *g, {B, H, K}, "B, H, K");
      kind = DecayKind::per_key;
    }
    g32 = g->to(at::kFloat).contiguous();
  }

  // fp32 contiguous copies (no copy when already so): the shared arithmetic reads raw fp32 rows.
  const at::Tensor q32 = q.to(at::kFloat).contiguous(), k32 = k.to(at::kFloat).contiguous();
  const at::Tensor v32 = v.to(at::kFloat).contiguous(), s_in = state.contiguous();
  at::Tensor o = at::empty({B, H, V}, q.options().dtype(at::kFloat));               // [B, H, V]
  if (in_place) check_in_place("linear_attention_step", {{"state", state}});
  // in place the new state is written over the input (every entry is read before it is written)
  at::Tensor s_out = in_place ? s_in : at::empty({B, H, K, V}, q.options().dtype(at::kFloat));  // [B, H, K, V]

  const float* qp = q32.data_ptr<float>();
  const float* kp = k32.data_ptr<float>();
  const float* vp = v32.data_ptr<float>();
  const float* gp = g32.defined() ? g32.data_ptr<float>() : nullptr;
  const float* sp = s_in.data_ptr<float>();
  float* op = o.data_ptr<float>();
  float* sop = s_out.data_ptr<float>();
  const int g_stride = kind == DecayKind::per_key ? K : 1;
  const float fscale = static_cast<float>(scale);
  const int Ki = static_cast<int>(K), Vi = static_cast<int>(V);

  // One task per (batch, head): ATen's OpenMP pool, sized by torch.set_num_threads.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* gbh = gp ? gp + bh * g_stride : nullptr;
      for (int j0 = 0; j0 < Vi; j0 += kTile) {
        linear_attn_step_columns<kTile>(qp + bh * K, kp + bh * K, vp + bh * V, gbh, kind, sp + bh * K * V,
                                        sop + bh * K * V, op + bh * V, Ki, Vi, j0, fscale);
      }
    }
  });
  return {o, s_out};
}

}  // namespace ipl
