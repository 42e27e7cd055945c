// One decoding step of TTT-MLP for one (sequence, head), on raw fp32 pointers (the op's torch path is
// ipl_layers/ops/ttt_mlp_chunk.py). The inner model maps K -> F -> K features, f(x) = LN(gelu(x W1 + b1) W2 + b2)
// (+ x) with the tanh GELU; the open mini-batch holds its start weights W1 [K, F], b1 [F], W2 [F, K], b2 [K],
// their gradient sums S_W1, S_b1, S_W2, S_b2 and its position p. For the token (q, k, v, eta), with s = s_p the
// position scale and t = v - k (v without the residual):
//
//     keys through the start weights:  z1 = k W1 + b1,  a = gelu(z1),  z2 = a W2 + b2
//     their gradients:                 G2 = d/dz2 1/2 ||LN(z2) - t||^2,  G1 = (G2 W2^T) * gelu'(z1)
//     the sums:                        S_W1 += eta k^T G1,  S_b1 += eta G1,  S_W2 += eta a^T G2,  S_b2 += eta G2
//     query through theta - s S:       x1 = q W1' + b1',  h = gelu(x1),  x2 = h W2' + b2',  o = LN(x2) (+ q)
//
// and at the mini-batch's end (p + 1 == C) the update is committed (theta' = theta - s S, S' = 0), as in
// TTT-Linear. Each layer is a TTT-Linear layer with rectangular weights, so the step reuses its tile functions
// and LN helpers (common/ttt_linear_step.h); what is new is the GELU and the backward through the hidden layer.
//
// Phases, separated by barriers on CUDA: (1) z1, a and gelu'(z1) by hidden columns f; (2) z2 by feature columns;
// (3) G2 from the LN statistics of z2; (4) per hidden unit f: G1[f] from row f of the start W2, then layer 1's
// update and x1, h by column f; (5) layer 2's update and x2 by feature columns (every read of the start W2 done);
// (6) o from the LN statistics of x2.
#pragma once

#include <math.h>

#include "common/host_device.h"
#include "common/ttt_linear_step.h"

namespace ipl {

// The tanh GELU's constants, as F.gelu(approximate="tanh") and ipl_layers/ops/ttt_mlp_chunk.py (GELU_C, GELU_A).
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// gelu(z) = z (1 + u) / 2 with u = tanh(c (z + a z^3)).
IPL_HOST_DEVICE float gelu_tanh(float z) { return 0.5f * z * (1.0f + tanhf(kGeluC * (z + kGeluA * z * z * z))); }

// gelu(z) (returned) and its slope gelu'(z) = (1 + u) / 2 + (c / 2) z (1 - u^2) (1 + 3 a z^2) (written).
IPL_HOST_DEVICE float gelu_tanh_and_slope(float z, float* slope) {
  const float z2 = z * z;
  const float u = tanhf(kGeluC * (z + kGeluA * z2 * z));
  const float half = 0.5f * (1.0f + u);
  *slope = half + 0.5f * kGeluC * z * (1.0f - u * u) * (1.0f + 3.0f * kGeluA * z2);
  return z * half;
}

// Phase 4, hidden unit f: G1[f] = (sum_j G2[j] W2[f, j]) gelu'(z1[f]). G2: [K]; W2: [F, K] row-major.
IPL_HOST_DEVICE float ttt_mlp_hidden_grad(const float* G2, const float* W2, float slope, int K, int f) {
  const float* row = W2 + static_cast<long long>(f) * K;  // [K]
  float acc = 0.0f;
  for (int j = 0; j < K; ++j) acc += G2[j] * row[j];
  return acc * slope;
}

}  // namespace ipl
