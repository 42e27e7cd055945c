// The CPU ops of ipl_layers._C (bound to Python in bindings.cpp).
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

namespace ipl {

// One decoding step of linear attention; see csrc/common/linear_attn_step.h for the math.
// q, k [B, H, K]; v [B, H, V]; g None, [B, H] or [B, H, K] (log-decay); state [B, H, K, V] fp32.
// Returns (o [B, H, V] fp32, new_state [B, H, K, V] fp32); `state` is not modified, except with in_place (state
// fp32 and contiguous): new_state is written over it and returned.
std::tuple<at::Tensor, at::Tensor> linear_attention_step(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const std::optional<at::Tensor>& g,
                                                         const at::Tensor& state, double scale, bool in_place);

// One decoding step of the (gated) delta rule; see csrc/common/delta_rule_step.h for the math.
// q, k [B, H, K]; v [B, H, V]; beta [B, H]; g None or [B, H] (log-decay); state [B, H, K, V] fp32.
// Returns (o [B, H, V] fp32, new_state [B, H, K, V] fp32); `state` is not modified, except with in_place (state
// fp32 and contiguous): new_state is written over it and returned.
std::tuple<at::Tensor, at::Tensor> delta_rule_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& beta, const std::optional<at::Tensor>& g,
                                                   const at::Tensor& state, double scale, bool in_place);

// One decoding step of the short causal depthwise convolution; see csrc/common/short_conv_step.h for the math.
// x [B, D]; weight [D, W]; bias None or [D]; state [B, D, W-1] (the last W-1 inputs, oldest first).
// Returns (y [B, D] fp32, new_state [B, D, W-1] fp32), y through silu when `silu`; `state` is not modified,
// except with in_place (state fp32 and contiguous): new_state is written over it and returned.
std::tuple<at::Tensor, at::Tensor> short_conv_step(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& state,
                                                   bool silu, bool in_place);

// One decoding step of TTT-Linear; see csrc/common/ttt_linear_step.h for the math.
// q, k, v [N, H, K]; eta [N, H]; ln_weight, ln_bias [H, K]; scale [H, C] (the position scales s_1..s_C);
// the open mini-batch's state W, sum_W [N, H, K, K], b, sum_b [N, H, K] and position [N] int64 in [0, C).
// Returns {o [N, H, K] fp32, W', b', sum_W', sum_b' (fp32), position' = (position + 1) % C}; no input is modified,
// except with in_place: W', b', sum_W', sum_b' are written over W, b, sum_W, sum_b (each fp32, contiguous, apart).
std::vector<at::Tensor> ttt_linear_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& eta, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                                        const at::Tensor& scale, const at::Tensor& W, const at::Tensor& b,
                                        const at::Tensor& sum_W, const at::Tensor& sum_b, const at::Tensor& position,
                                        bool use_ln, bool use_residual, bool use_bias, bool in_place);

// One decoding step of TTT-MLP (inner MLP K -> F -> K); see csrc/common/ttt_mlp_step.h for the math.
// q, k, v [N, H, K]; eta [N, H]; ln_weight, ln_bias [H, K]; scale [H, C] (the position scales s_1..s_C);
// the open mini-batch's state W1, sum_W1 [N, H, K, F], b1, sum_b1 [N, H, F], W2, sum_W2 [N, H, F, K],
// b2, sum_b2 [N, H, K] and position [N] int64 in [0, C).
// Returns {o [N, H, K] fp32, W1', b1', W2', b2', sum_W1', sum_b1', sum_W2', sum_b2' (fp32),
// position' = (position + 1) % C}; no input is modified, except with in_place: the new state is written over
// the eight state tensors (each fp32, contiguous, apart from the others), which are returned.
std::vector<at::Tensor> ttt_mlp_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& eta, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                                     const at::Tensor& scale, const at::Tensor& W1, const at::Tensor& b1,
                                     const at::Tensor& W2, const at::Tensor& b2, const at::Tensor& sum_W1,
                                     const at::Tensor& sum_b1, const at::Tensor& sum_W2, const at::Tensor& sum_b2,
                                     const at::Tensor& position, bool use_ln, bool use_residual, bool in_place);

// One decoding step of the Titans memory (an MLP of depth L); see csrc/common/titans_step.h for the math.
// q, k [N, H, K]; v [N, H, V]; theta, eta, alpha [N, H]; ln_weight, ln_bias [H, V]; start, momentum, weights:
// L matrices [N, H, d_l, d_{l+1}] each (d_0 = K, d_L = V); position [N] int64 in [0, C); normalize_step scales
// theta by titans_step_scale; in_place writes the new state over start, momentum and weights (each fp32,
// contiguous, apart from the others) and returns them.
// Returns {o [N, H, V] fp32, start'..., momentum'..., weights'... (fp32), position' = (position + 1) % C}; no
// input is modified but the state with in_place.
std::vector<at::Tensor> titans_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                    const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                                    const std::vector<at::Tensor>& start, const std::vector<at::Tensor>& momentum,
                                    const std::vector<at::Tensor>& weights, const at::Tensor& position, int64_t C,
                                    bool use_ln, bool use_residual, bool normalize_step, bool in_place);

// The weighted embedding bag (csrc/common/embedding_bag.h): indices [M, n] int64, weights [M, n], values [N, D].
// Returns out [M, D] fp32.
at::Tensor embedding_bag_forward(const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& values);

// Its backward from dout [M, D] and the reverse index (order [M * n] the flat entries sorted by row, offsets [U]
// where each touched row's run starts): (dweights [M, n] fp32, drows [U, D] fp32, the touched rows' gradients).
std::tuple<at::Tensor, at::Tensor> embedding_bag_backward(const at::Tensor& indices, const at::Tensor& weights,
                                                          const at::Tensor& values, const at::Tensor& dout,
                                                          const at::Tensor& order, const at::Tensor& offsets);

// The k largest entries of each row of x [R, n] float32, sorted descending, ties earlier index first:
// (values [R, k], indices [R, k] int64). For small k (the product-key search).
std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& x, int64_t k);

}  // namespace ipl
