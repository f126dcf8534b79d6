// The one TORCH_LIBRARY block: every schema of the extension, declared once. Kernels register per
// device in <op>.cpp (CPU) and <op>_cuda.cu (CUDA, the kernels themselves in <op>_kernels.cuh); fake kernels and
// autograd are registered in Python (blip3o_fast/ops/), as torch.library recommends for ops that must work under
// torch.compile.
#include <torch/library.h>

TORCH_LIBRARY(blip3o_fast, m) {
  // 3-axis rotary embedding of q and k, [B, S, H, D], interleaved pairs, one launch for both
  m.def("rope3d(Tensor q, Tensor k, Tensor cos_q, Tensor sin_q, Tensor cos_k, Tensor sin_k) -> (Tensor, Tensor)");
  m.def(
      "rope3d_bwd(Tensor grad_q, Tensor grad_k, Tensor cos_q, Tensor sin_q, Tensor cos_k, Tensor sin_k)"
      " -> (Tensor, Tensor)");

  // qk-norm then RoPE: out = rope3d(x * rstd * weight), rstd = 1/sqrt(mean(x^2) + eps) per head vector;
  // rstd [B, S, H] is saved for the backward
  m.def(
      "qk_norm_rope3d(Tensor q, Tensor k, Tensor weight_q, Tensor weight_k, float eps, Tensor cos_q,"
      " Tensor sin_q, Tensor cos_k, Tensor sin_k) -> (Tensor q_out, Tensor k_out, Tensor rstd_q, Tensor rstd_k)");
  m.def(
      "qk_norm_rope3d_bwd(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor weight_q, Tensor weight_k,"
      " Tensor rstd_q, Tensor rstd_k, Tensor cos_q, Tensor sin_q, Tensor cos_k, Tensor sin_k)"
      " -> (Tensor grad_q_in, Tensor grad_k_in, Tensor grad_weight_q, Tensor grad_weight_k)");

  // y = N(x) * (1 + scale) + shift, N = LayerNorm or RMSNorm over C without affine weights
  m.def(
      "adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps, str norm)"
      " -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "adaln_modulate_bwd(Tensor grad_y, Tensor x, Tensor scale, Tensor mean, Tensor rstd, str norm)"
      " -> (Tensor grad_x, Tensor grad_shift, Tensor grad_scale)");

  // x_new = x + gate * y; h = N(x_new) * (1 + scale) + shift: closes one residual branch, opens the next
  m.def(
      "gated_residual_adaln(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, float eps, str norm)"
      " -> (Tensor x_new, Tensor h, Tensor mean, Tensor rstd)");
  m.def(
      "gated_residual_adaln_bwd(Tensor grad_x_new, Tensor grad_h, Tensor x_new, Tensor y, Tensor gate,"
      " Tensor scale, Tensor mean, Tensor rstd, str norm)"
      " -> (Tensor grad_x, Tensor grad_y, Tensor grad_gate, Tensor grad_shift, Tensor grad_scale)");

  // SwiGLU of a fused [a | b] projection: silu(a)·b over the last dim ([..., 2F] -> [..., F])
  m.def("swiglu(Tensor ab) -> Tensor");
  m.def("swiglu_bwd(Tensor grad, Tensor ab) -> Tensor grad_ab");

  // rectified flow: x_t = (1 - t) x0 + t x1; loss = sum_b w_b mean_{s,c} (v - (x1 - x0))^2 / B
  m.def("flow_interpolate(Tensor x1, Tensor x0, Tensor t) -> Tensor");
  // only the requested gradients are computed; an unrequested one is returned empty ([0])
  m.def(
      "flow_interpolate_bwd(Tensor grad_x_t, Tensor t, bool need_x1=True, bool need_x0=True)"
      " -> (Tensor grad_x1, Tensor grad_x0)");
  m.def(
      "flow_matching_loss(Tensor v, Tensor x1, Tensor x0, Tensor t, Tensor? weight)"
      " -> (Tensor loss, Tensor per_sample_mse, Tensor per_sample_cos)");
  // grad_per_sample[b] = dL/dper_sample_mse[b] (w_b·dloss/B from the loss): dv = 2·g_b·(v - u)/(S·C)
  m.def("flow_matching_loss_bwd(Tensor grad_per_sample, Tensor v, Tensor x1, Tensor x0) -> Tensor grad_v");
}
