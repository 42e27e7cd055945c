// The CPU ops of ipl_layers._C (bound to Python in bindings.cpp).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace ipl {

// One decoding step of linear attention; see csrc/common/linear_attn_step.h for the math.
// q, k [B, H, K]; v [B, H, V]; g None, [B, H] or [B, H, K] (log-decay); state [B, H, K, V] fp32.
// Returns (o [B, H, V] fp32, new_state [B, H, K, V] fp32); `state` is not modified.
std::tuple<at::Tensor, at::Tensor> linear_attention_step(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const std::optional<at::Tensor>& g,
                                                         const at::Tensor& state, double scale);

}  // namespace ipl
