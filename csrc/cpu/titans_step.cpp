// CPU Titans decoding step: checks, fp32 staging, and a parallel loop over (sequence, head).
// Arithmetic: csrc/common/titans_step.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/titans_step.h"
#include "cpu/checks.h"
#include "cpu/ops.h"

namespace ipl {
namespace {

constexpr int kTile = 16;  // columns per call of the shared tile functions (fp32 accumulators in registers)
constexpr const char* kOp = "titans_step";

}  // namespace

std::vector<at::Tensor> titans_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                    const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                                    const std::vector<at::Tensor>& start, const std::vector<at::Tensor>& momentum,
                                    const std::vector<at::Tensor>& weights, const at::Tensor& position, int64_t C,
                                    bool use_ln, bool use_residual, bool normalize_step,
                                    bool in_place) {
  check_float_cpu(kOp, "q", q, 3, {}, "N, H, K");
  const int64_t N = q.size(0), H = q.size(1), K = q.size(2);
  check_float_cpu(kOp, "k", k, 3, {N, H, K}, "N, H, K");
  check_float_cpu(kOp, "v", v, 3, {}, "N, H, V");
  const int64_t V = v.size(2);
  check_float_cpu(kOp, "v", v, 3, {N, H, V}, "N, H, V");
  TORCH_CHECK_VALUE(!use_residual || V == K, kOp, ": v: the residual needs V == K, got V = ", V, ", K = ", K);
  check_float_cpu(kOp, "theta", theta, 2, {N, H}, "N, H");
  check_float_cpu(kOp, "eta", eta, 2, {N, H}, "N, H");
  check_float_cpu(kOp, "alpha", alpha, 2, {N, H}, "N, H");
  check_float_cpu(kOp, "ln_weight", ln_weight, 2, {H, V}, "H, V");
  check_float_cpu(kOp, "ln_bias", ln_bias, 2, {H, V}, "H, V");
  const int64_t L = static_cast<int64_t>(start.size());
  TORCH_CHECK_VALUE(L >= 1 && momentum.size() == start.size() && weights.size() == start.size(), kOp,
                    ": state: expected L >= 1 matrices each of start, momentum and weights, got ", start.size(),
                    ", ", momentum.size(), ", ", weights.size());
  std::vector<int64_t> dims{K};  // d_0 .. d_L
  for (int64_t l = 0; l < L; ++l) {
    const std::string at_l = "[" + std::to_string(l) + "]";
    check_float_cpu(kOp, "start" + at_l, start[l], 4, {}, "N, H, d_in, d_out");
    const int64_t d_out = start[l].size(3);
    check_float_cpu(kOp, "start" + at_l, start[l], 4, {N, H, dims.back(), d_out}, "N, H, d_in, d_out");
    check_float_cpu(kOp, "momentum" + at_l, momentum[l], 4, {N, H, dims.back(), d_out}, "N, H, d_in, d_out");
    check_float_cpu(kOp, "weights" + at_l, weights[l], 4, {N, H, dims.back(), d_out}, "N, H, d_in, d_out");
    dims.push_back(d_out);
  }
  TORCH_CHECK_VALUE(dims.back() == V, kOp, ": start[", L - 1, "]: the last layer must map to V = ", V,
                    " features, got ", dims.back());
  TORCH_CHECK_VALUE(C >= 1, kOp, ": C: expected a positive chunk size, got ", C);
  const at::Tensor pos = check_position(kOp, position, N, C);
  const int64_t* pp = pos.data_ptr<int64_t>();
  // fp32 contiguous copies (none when already so); the outputs are new tensors (the inputs are not modified)
  const at::Tensor q32 = f32(q), k32 = f32(k), v32 = f32(v), th32 = f32(theta), et32 = f32(eta), al32 = f32(alpha);
  const at::Tensor g32 = f32(ln_weight), b32 = f32(ln_bias);
  const auto opts = q.options().dtype(at::kFloat);
  if (in_place) {
    std::vector<std::pair<std::string, at::Tensor>> state;
    for (const auto& [name, group] : {std::pair{"start", &start}, {"momentum", &momentum}, {"weights", &weights}}) {
      for (int64_t l = 0; l < L; ++l) state.emplace_back(std::string(name) + "[" + std::to_string(l) + "]", (*group)[l]);
    }
    check_in_place(kOp, state);
  }
  // in place: the outputs are the inputs (the shared arithmetic reads each entry before it writes it)
  std::vector<at::Tensor> G_in, S_in, M_in, G_out, S_out, M_out;
  for (int64_t l = 0; l < L; ++l) {
    G_in.push_back(f32(start[l]));
    S_in.push_back(f32(momentum[l]));
    M_in.push_back(f32(weights[l]));
    for (auto [out, in] : {std::pair{&G_out, &G_in}, {&S_out, &S_in}, {&M_out, &M_in}}) {
      out->push_back(in_place ? in->back() : at::empty({N, H, dims[l], dims[l + 1]}, opts));
    }
  }
  at::Tensor o = at::empty({N, H, V}, opts);  // [N, H, V]
  std::vector<int64_t> x_off{0}, z_off{0};     // offsets of x_l (d_l) and z_l (d_{l+1}) in the scratch
  for (int64_t l = 0; l < L; ++l) {
    x_off.push_back(x_off.back() + dims[l]);
    z_off.push_back(z_off.back() + dims[l + 1]);
  }
  const int64_t widest = *std::max_element(dims.begin(), dims.end());
  const float *qp = q32.data_ptr<float>(), *kp = k32.data_ptr<float>(), *vp = v32.data_ptr<float>();
  const float *thp = th32.data_ptr<float>(), *etp = et32.data_ptr<float>(), *alp = al32.data_ptr<float>();
  const float *gp = g32.data_ptr<float>(), *bp = b32.data_ptr<float>();
  float* op = o.data_ptr<float>();
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    // x_l [d_l], z_l and d_l [d_{l+1}] of every layer, the LN's xhat [V], two query vectors [widest]
    std::vector<float> scratch(x_off[L] + 2 * z_off[L] + V + 2 * widest);
    float *xs = scratch.data(), *zs = xs + x_off[L], *ds = zs + z_off[L], *xh = ds + z_off[L], *a = xh + V;
    float* h = a + widest;
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t hh = nh % H;
      const bool full = pp[nh / H] + 1 == C;
      const float *qv = qp + nh * K, *kv = kp + nh * K, *vv = vp + nh * V, *gamma = gp + hh * V, *beta = bp + hh * V;
      auto mat = [&](const std::vector<at::Tensor>& t, int64_t l) {  // this (n, h)'s [d_l, d_{l+1}] matrix
        return t[l].data_ptr<float>() + nh * dims[l] * dims[l + 1];
      };
      std::copy(kv, kv + K, xs);
      for (int64_t l = 0; l < L; ++l) {  // the keys through the start weights
        const int di = static_cast<int>(dims[l]), dout = static_cast<int>(dims[l + 1]);
        float* z = zs + z_off[l];
        for (int j0 = 0; j0 < dout; j0 += kTile) {
          titans_matvec_columns<kTile>(xs + x_off[l], mat(G_in, l), z, di, dout, j0);
        }
        if (l + 1 < L) for (int j = 0; j < dout; ++j) xs[x_off[l + 1] + j] = gelu_exact(z[j]);
      }
      const float* z_last = zs + z_off[L - 1];
      float* d_last = ds + z_off[L - 1];
      const int Vi = static_cast<int>(V);
      // twice TTT's gradient: Titans' loss is ||LN(z) - t||^2, not half of it
      ttt_loss_grad(z_last, vv, kv, gamma, beta, Vi, use_ln, use_residual, 2.0f, d_last, xh);
      for (int64_t l = L - 1; l > 0; --l) {  // back through the start weights
        const int di = static_cast<int>(dims[l]), dout = static_cast<int>(dims[l + 1]);
        for (int i = 0; i < di; ++i) {
          ds[z_off[l - 1] + i] = titans_backprop_row(ds + z_off[l], mat(G_in, l), zs[z_off[l - 1] + i], dout, i);
        }
      }
      const float theta = normalize_step ? thp[nh] * titans_step_scale(xs, ds, dims.data(), static_cast<int>(L))
                                         : thp[nh];
      for (int64_t l = 0; l < L; ++l) {
        const int di = static_cast<int>(dims[l]), dout = static_cast<int>(dims[l + 1]);
        for (int j0 = 0; j0 < dout; j0 += kTile) {
          titans_update_columns<kTile>(xs + x_off[l], ds + z_off[l], theta, etp[nh], alp[nh], mat(G_in, l),
                                       mat(S_in, l), mat(M_in, l), mat(G_out, l), mat(S_out, l), mat(M_out, l), di,
                                       dout, j0, full);
        }
      }
      std::copy(qv, qv + K, a);
      for (int64_t l = 0; l < L; ++l) {  // the query through the new weights
        const int di = static_cast<int>(dims[l]), dout = static_cast<int>(dims[l + 1]);
        for (int j0 = 0; j0 < dout; j0 += kTile) titans_matvec_columns<kTile>(a, mat(M_out, l), h, di, dout, j0);
        if (l + 1 < L) for (int j = 0; j < dout; ++j) a[j] = gelu_exact(h[j]);
      }
      float mu = 0.0f, r = 1.0f;
      if (use_ln) ttt_ln_stats(h, Vi, &mu, &r);
      for (int j = 0; j < Vi; ++j) {
        op[nh * V + j] = ttt_readout_feature(h, qv, gamma, beta, mu, r, j, use_ln, use_residual);
      }
    }
  });
  std::vector<at::Tensor> outs{o};
  for (const auto* group : {&G_out, &S_out, &M_out}) outs.insert(outs.end(), group->begin(), group->end());
  outs.push_back(at::remainder(pos + 1, C));
  return outs;
}

}  // namespace ipl
