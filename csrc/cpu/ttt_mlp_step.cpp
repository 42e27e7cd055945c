// CPU TTT-MLP decoding step: checks, fp32 staging, and a parallel loop over (sequence, head).
// Arithmetic: csrc/common/ttt_mlp_step.h (on the TTT-Linear tile functions of csrc/common/ttt_linear_step.h).
#include <ATen/Parallel.h>

#include <vector>

#include "common/ttt_mlp_step.h"
#include "cpu/checks.h"
#include "cpu/ops.h"

namespace ipl {
namespace {

constexpr int kTile = 16;  // columns per call of the shared tile functions (fp32 accumulators in registers)
constexpr const char* kOp = "ttt_mlp_step";

}  // namespace

std::vector<at::Tensor> ttt_mlp_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& eta, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                                     const at::Tensor& scale, const at::Tensor& W1, const at::Tensor& b1,
                                     const at::Tensor& W2, const at::Tensor& b2, const at::Tensor& sum_W1,
                                     const at::Tensor& sum_b1, const at::Tensor& sum_W2, const at::Tensor& sum_b2,
                                     const at::Tensor& position, bool use_ln, bool use_residual, bool in_place) {
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
  check_float_cpu(kOp, "W1", W1, 4, {}, "N, H, K, F");
  const int64_t F = W1.size(3);
  check_float_cpu(kOp, "W1", W1, 4, {N, H, K, F}, "N, H, K, F");
  check_float_cpu(kOp, "b1", b1, 3, {N, H, F}, "N, H, F");
  check_float_cpu(kOp, "W2", W2, 4, {N, H, F, K}, "N, H, F, K");
  check_float_cpu(kOp, "b2", b2, 3, {N, H, K}, "N, H, K");
  check_float_cpu(kOp, "sum_W1", sum_W1, 4, {N, H, K, F}, "N, H, K, F");
  check_float_cpu(kOp, "sum_b1", sum_b1, 3, {N, H, F}, "N, H, F");
  check_float_cpu(kOp, "sum_W2", sum_W2, 4, {N, H, F, K}, "N, H, F, K");
  check_float_cpu(kOp, "sum_b2", sum_b2, 3, {N, H, K}, "N, H, K");
  const at::Tensor pos = check_position(kOp, position, N, C);
  const int64_t* pp = pos.data_ptr<int64_t>();
  // fp32 contiguous copies (none when already so): the shared arithmetic reads raw fp32 rows
  const at::Tensor q32 = f32(q), k32 = f32(k), v32 = f32(v), e32 = f32(eta), g32 = f32(ln_weight);
  const at::Tensor be32 = f32(ln_bias), s32 = f32(scale);
  if (in_place) {
    check_in_place(kOp, {{"W1", W1}, {"b1", b1}, {"W2", W2}, {"b2", b2}, {"sum_W1", sum_W1}, {"sum_b1", sum_b1},
                         {"sum_W2", sum_W2}, {"sum_b2", sum_b2}});
  }
  std::vector<at::Tensor> state_in, state_out;  // W1, b1, W2, b2, then their sums
  const float* in_p[8];
  float* out_p[8];
  for (const at::Tensor* x : {&W1, &b1, &W2, &b2, &sum_W1, &sum_b1, &sum_W2, &sum_b2}) {
    state_in.push_back(f32(*x));
    // every entry is written; in place the output is the input (each entry is read before it is written)
    state_out.push_back(in_place ? state_in.back() : at::empty(x->sizes(), q.options().dtype(at::kFloat)));
    in_p[state_in.size() - 1] = state_in.back().data_ptr<float>();
    out_p[state_out.size() - 1] = state_out.back().data_ptr<float>();
  }
  at::Tensor o = at::empty({N, H, K}, q.options().dtype(at::kFloat));  // [N, H, K]
  const float *qp = q32.data_ptr<float>(), *kp = k32.data_ptr<float>(), *vp = v32.data_ptr<float>();
  const float *ep = e32.data_ptr<float>(), *gp = g32.data_ptr<float>(), *bep = be32.data_ptr<float>();
  const float* sp = s32.data_ptr<float>();
  float* op = o.data_ptr<float>();
  const int Ki = static_cast<int>(K), Fi = static_cast<int>(F);
  // one task per (sequence, head): ATen's OpenMP pool, sized by torch.set_num_threads
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    // a = gelu(z1), G1 (gelu'(z1) until phase 4), h = gelu(x1): [F] each; z2, xh, G2, x2: [K] each
    std::vector<float> scratch(3 * F + 4 * K);
    float *a = scratch.data(), *G1 = a + F, *hq = G1 + F, *z2 = hq + F, *xh = z2 + K, *G2 = xh + K, *x2 = G2 + K;
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t h = nh % H, p = pp[nh / H];
      const float *qv = qp + nh * K, *kv = kp + nh * K, *vv = vp + nh * K, *gamma = gp + h * K, *beta = bep + h * K;
      const float e = ep[nh], s = sp[h * C + p];
      const bool commit = p + 1 == C;
      // this (sequence, head)'s [K, F], [F], [F, K], [K] blocks of state tensor i (in or out)
      const int64_t offset[4] = {nh * K * F, nh * F, nh * F * K, nh * K};
      auto in = [&](int i) { return in_p[i] + offset[i % 4]; };
      auto out = [&](int i) { return out_p[i] + offset[i % 4]; };
      for (int j0 = 0; j0 < Fi; j0 += kTile) ttt_linear_z_columns<kTile>(kv, in(0), in(1), a, Ki, Fi, j0);
      for (int f = 0; f < Fi; ++f) a[f] = gelu_tanh_and_slope(a[f], &G1[f]);
      for (int j0 = 0; j0 < Ki; j0 += kTile) ttt_linear_z_columns<kTile>(a, in(2), in(3), z2, Fi, Ki, j0);
      ttt_loss_grad(z2, vv, kv, gamma, beta, Ki, use_ln, use_residual, 1.0f, G2, xh);
      for (int f = 0; f < Fi; ++f) G1[f] = ttt_mlp_hidden_grad(G2, in(2), G1[f], Ki, f);
      for (int j0 = 0; j0 < Fi; j0 += kTile) {  // layer 1: K -> F, from the token's key
        ttt_linear_update_columns<kTile>(qv, kv, e, G1, s, in(0), in(4), out(0), out(4), hq, Ki, Fi, j0, commit);
      }
      for (int f = 0; f < Fi; ++f) {
        hq[f] = gelu_tanh(hq[f] + ttt_linear_bias_feature(G1[f], e, s, in(1), in(5), out(1), out(5), f, commit));
      }
      for (int j0 = 0; j0 < Ki; j0 += kTile) {  // layer 2: F -> K, from the key's activations a
        ttt_linear_update_columns<kTile>(hq, a, e, G2, s, in(2), in(6), out(2), out(6), x2, Fi, Ki, j0, commit);
      }
      for (int j = 0; j < Ki; ++j) {
        x2[j] += ttt_linear_bias_feature(G2[j], e, s, in(3), in(7), out(3), out(7), j, commit);
      }
      float mu = 0.0f, r = 1.0f;
      if (use_ln) ttt_ln_stats(x2, Ki, &mu, &r);
      for (int j = 0; j < Ki; ++j) {
        op[nh * K + j] = ttt_readout_feature(x2, qv, gamma, beta, mu, r, j, use_ln, use_residual);
      }
    }
  });
  std::vector<at::Tensor> outs{o};
  outs.insert(outs.end(), state_out.begin(), state_out.end());
  outs.push_back(at::remainder(pos + 1, C));
  return outs;
}

}  // namespace ipl
