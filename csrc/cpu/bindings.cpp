// Python module ipl_layers._C: the CPU ops, called through ipl_layers/_ext.py.
#include <torch/extension.h>

#include "cpu/ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ipl-layers C++ CPU ops";
  m.def("linear_attention_step", &ipl::linear_attention_step,
        "One linear-attention decoding step: (o [B, H, V] fp32, new_state [B, H, K, V] fp32)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("g"), py::arg("state"), py::arg("scale"), py::arg("in_place"),
        py::call_guard<py::gil_scoped_release>());
  m.def("delta_rule_step", &ipl::delta_rule_step,
        "One (gated) delta-rule decoding step: (o [B, H, V] fp32, new_state [B, H, K, V] fp32)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("beta"), py::arg("g"), py::arg("state"), py::arg("scale"),
        py::arg("in_place"), py::call_guard<py::gil_scoped_release>());
  m.def("short_conv_step", &ipl::short_conv_step,
        "One short-conv decoding step: (y [B, D] fp32, new_state [B, D, W-1] fp32)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("state"), py::arg("silu"), py::arg("in_place"), py::call_guard<py::gil_scoped_release>());
  m.def("ttt_linear_step", &ipl::ttt_linear_step,
        "One TTT-Linear decoding step: [o [N, H, K] fp32, W, b, sum_W, sum_b (fp32), position]", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("eta"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("scale"),
        py::arg("W"), py::arg("b"), py::arg("sum_W"), py::arg("sum_b"), py::arg("position"), py::arg("use_ln"),
        py::arg("use_residual"), py::arg("use_bias"), py::arg("in_place"),
        py::call_guard<py::gil_scoped_release>());
  m.def("ttt_mlp_step", &ipl::ttt_mlp_step,
        "One TTT-MLP decoding step: [o [N, H, K] fp32, W1, b1, W2, b2, sum_W1, sum_b1, sum_W2, sum_b2 (fp32), "
        "position]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("eta"), py::arg("ln_weight"), py::arg("ln_bias"),
        py::arg("scale"), py::arg("W1"), py::arg("b1"), py::arg("W2"), py::arg("b2"), py::arg("sum_W1"),
        py::arg("sum_b1"), py::arg("sum_W2"), py::arg("sum_b2"), py::arg("position"), py::arg("use_ln"),
        py::arg("use_residual"), py::arg("in_place"), py::call_guard<py::gil_scoped_release>());
  m.def("titans_step", &ipl::titans_step,
        "One Titans-memory decoding step: [o [N, H, V] fp32, start..., momentum..., weights... (fp32), position]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("theta"), py::arg("eta"), py::arg("alpha"),
        py::arg("ln_weight"), py::arg("ln_bias"), py::arg("start"), py::arg("momentum"), py::arg("weights"),
        py::arg("position"), py::arg("C"), py::arg("use_ln"), py::arg("use_residual"), py::arg("normalize_step"),
        py::arg("in_place"), py::call_guard<py::gil_scoped_release>());
  m.def("topk_rows", &ipl::topk_rows, "Top-k of each row, sorted descending: (values [R, k], indices [R, k])",
        py::arg("x"), py::arg("k"), py::call_guard<py::gil_scoped_release>());
  m.def("embedding_bag_forward", &ipl::embedding_bag_forward, "Weighted embedding bag: out [M, D] fp32",
        py::arg("indices"), py::arg("weights"), py::arg("values"), py::call_guard<py::gil_scoped_release>());
  m.def("embedding_bag_backward", &ipl::embedding_bag_backward,
        "Its backward: (dweights [M, n] fp32, drows [U, D] fp32) from the reverse index", py::arg("indices"),
        py::arg("weights"), py::arg("values"), py::arg("dout"), py::arg("order"), py::arg("offsets"),
        py::call_guard<py::gil_scoped_release>());
}
