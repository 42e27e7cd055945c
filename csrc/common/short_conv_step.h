// One decoding step of the short causal depthwise convolution for one (sequence, channel), on raw fp32 pointers.
//
//     z = bias + sum_{w < W-1} weight[w] h[w] + weight[W-1] x,   y = act(z),   h' = (h[1], ..., h[W-2], x)
//
// h is the channel's last W-1 inputs, oldest first. The CPU extension runs it over channels in a parallel
// loop, the CUDA kernel one channel per thread: the same code, so the CPU tests check the arithmetic the GPU runs.
#pragma once

#include <math.h>

#include "common/host_device.h"

namespace ipl {

// weight: [W]; h_in, h_out: [W-1] (they may alias: each h_in[w] is read before h_out[w] is written).
// Returns y.
IPL_HOST_DEVICE float short_conv_step_channel(float x, const float* weight, float bias, const float* h_in,
                                              float* h_out, int W, bool silu) {
  float z = bias + weight[W - 1] * x;
  for (int w = 0; w < W - 1; ++w) {
    const float h = h_in[w];
    z += weight[w] * h;
    if (w > 0) h_out[w - 1] = h;  // shift left by one: the oldest input drops out
  }
  if (W > 1) h_out[W - 2] = x;
  return silu ? z / (1.0f + expf(-z)) : z;
}

}  // namespace ipl
