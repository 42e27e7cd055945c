// CPU TTT-Linear decoding step: checks, fp32 staging, and a parallel loop over (sequence, head).
// Arithmetic: csrc/common/ttt_linear_step.h.
#include <ATen/Parallel.h>

#include <vector>

#include "common/ttt_linear_step.h"
#include "cpu/checks.h"
#include "cpu/ops.h"

namespace ipl {
namespace {

constexpr int kTile = 16;  // columns per call of the shared tile functions (fp32 accumulators in registers)
constexpr const char* kOp = "ttt_linear_step";

}  // namespace

std::vector<at::Tensor> ttt_linear_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& eta, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                                        const at::Tensor& scale, const at::Tensor& W, const at::Tensor& b,
                                        const at::Tensor& sum_W, const at::Tensor& sum_b, const at::Tensor& position,
                                        bool use_ln, bool use_residual, bool use_bias, bool in_place) {
  check_float_cpu(kOp, "q", q, 3, {}, "N, H, K");
  const int64_t N = q.size(0), H = q.size(1), K = q.size(2);
  check_float_cpu(kOp, "k", k, 3, {N, H, K}, "N, H, K");
  check_float_cpu(kOp, "v", v, 3, {N, H, K}, "N, H, K");
  check_float_cpu(kOp, "eta", eta, 2, {N, H}, "N, H");
  check_float_cpu(kOp, "ln_weight", ln_weight, 2, {H, K}, "H, K");
  check_float_cpu(kOp, "ln_bias", ln_bias, 2, {H, K}, "H, K");
  check_float_cpu(kOp, "scale", scale, 2, {}, "H, C");
  const int64_t C = scale.size(1);
  TORCH_CHECK_VALUE(scale.size(0) == H && C >= 1, kOp, ": scale: expected shape [H, C] with H = ", H,
                    " and C >= 1, got ", scale.sizes());
  check_float_cpu(kOp, "W", W, 4, {N, H, K, K}, "N, H, K, K");
  check_float_cpu(kOp, "b", b, 3, {N, H, K}, "N, H, K");
  check_float_cpu(kOp, "sum_W", sum_W, 4, {N, H, K, K}, "N, H, K, K");
  check_float_cpu(kOp, "sum_b", sum_b, 3, {N, H, K}, "N, H, K");
  const at::Tensor pos = check_position(kOp, position, N, C);
  const int64_t* pp = pos.data_ptr<int64_t>();
  // fp32 contiguous copies (none when already so): the shared arithmetic reads raw fp32 rows
  const at::Tensor q32 = f32(q), k32 = f32(k), v32 = f32(v), e32 = f32(eta), g32 = f32(ln_weight);
  const at::Tensor be32 = f32(ln_bias), s32 = f32(scale), W32 = f32(W), b32 = f32(b), S32 = f32(sum_W);
  const at::Tensor sb32 = f32(sum_b);
  const auto opts = q.options().dtype(at::kFloat);
  at::Tensor o = at::empty({N, H, K}, opts);               // [N, H, K]
  if (in_place) check_in_place(kOp, {{"W", W}, {"b", b}, {"sum_W", sum_W}, {"sum_b", sum_b}});
  // in place the outputs are the inputs: each entry is read before it is written
  at::Tensor W_out = in_place ? W32 : at::empty({N, H, K, K}, opts);  // [N, H, K, K]
  at::Tensor S_out = in_place ? S32 : at::empty({N, H, K, K}, opts);  // [N, H, K, K]
  at::Tensor b_out = in_place ? b32 : b32.clone();                    // [N, H, K]: unchanged without bias
  at::Tensor sb_out = in_place ? sb32 : sb32.clone();                 // [N, H, K]
  const float *qp = q32.data_ptr<float>(), *kp = k32.data_ptr<float>(), *vp = v32.data_ptr<float>();
  const float *ep = e32.data_ptr<float>(), *gp = g32.data_ptr<float>(), *bep = be32.data_ptr<float>();
  const float *sp = s32.data_ptr<float>(), *Wp = W32.data_ptr<float>(), *bp = b32.data_ptr<float>();
  const float *Sp = S32.data_ptr<float>(), *sbp = sb32.data_ptr<float>();
  float *op = o.data_ptr<float>(), *Wop = W_out.data_ptr<float>(), *Sop = S_out.data_ptr<float>();
  float *bop = b_out.data_ptr<float>(), *sbop = sb_out.data_ptr<float>();
  const int Ki = static_cast<int>(K);
  // one task per (sequence, head): ATen's OpenMP pool, sized by torch.set_num_threads
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(4 * K);  // z, xhat, G, x: [K] each
    float *z = scratch.data(), *xh = z + K, *G = xh + K, *x = G + K;
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t h = nh % H, p = pp[nh / H];
      const float *qv = qp + nh * K, *kv = kp + nh * K, *vv = vp + nh * K, *gamma = gp + h * K, *beta = bep + h * K;
      const float e = ep[nh], s = sp[h * C + p];
      const bool commit = p + 1 == C;
      const long long mat = nh * K * K, vec = nh * K;
      for (int j0 = 0; j0 < Ki; j0 += kTile) {
        ttt_linear_z_columns<kTile>(kv, Wp + mat, use_bias ? bp + vec : nullptr, z, Ki, Ki, j0);
      }
      ttt_loss_grad(z, vv, kv, gamma, beta, Ki, use_ln, use_residual, 1.0f, G, xh);
      for (int j0 = 0; j0 < Ki; j0 += kTile) {
        ttt_linear_update_columns<kTile>(qv, kv, e, G, s, Wp + mat, Sp + mat, Wop + mat, Sop + mat, x, Ki, Ki, j0,
                                         commit);
      }
      if (use_bias) {
        for (int j = 0; j < Ki; ++j) {
          x[j] += ttt_linear_bias_feature(G[j], e, s, bp + vec, sbp + vec, bop + vec, sbop + vec, j, commit);
        }
      }
      float mu = 0.0f, r = 1.0f;
      if (use_ln) ttt_ln_stats(x, Ki, &mu, &r);
      for (int j = 0; j < Ki; ++j) {
        op[vec + j] = ttt_readout_feature(x, qv, gamma, beta, mu, r, j, use_ln, use_residual);
      }
    }
  });
  return {o, W_out, b_out, S_out, sb_out, at::remainder(pos + 1, C)};
}

}  // namespace ipl
