// Launchers of the fused steering kernels (steer_kernels.cu). steer_ops.cpp checks and prepares the tensors:
// every tensor here is contiguous and on the current CUDA device, and the launch uses the current stream.
#pragma once

#include <ATen/core/Tensor.h>

namespace steermoe {

// x, y (N, D) in fp32/bf16/fp16, N > 0; w, v (E, D) fp32 with 1 <= E <= 64; bias (E,) fp32 or undefined;
// scale (1,) fp32; gating (N, E) fp32, or undefined to skip storing it; residual (N, D) in x's dtype, or undefined:
// when given, the input of the step is h = residual + x rounded to x's dtype (computed in registers, never stored).
void launch_steer_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& v,
                          const at::Tensor& scale, const at::Tensor& y, const at::Tensor& gating,
                          const at::Tensor& residual);

// dy, y, dx (N, D) in y's dtype, N > 0; gating (N, E) fp32 and its upstream gradient grad_gating (N, E) fp32 or
// undefined; w, v (E, D) fp32; scale (1,) fp32. Writes dx and dlogits (N, E) fp32; returns the (P, workspace_row)
// fp32 workspace of per-block partial sums (layout: steermoe/workspace.py), P chosen here.
at::Tensor launch_steer_backward(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& gating,
                                 const at::Tensor& grad_gating, const at::Tensor& w, const at::Tensor& v,
                                 const at::Tensor& scale, const at::Tensor& dx, const at::Tensor& dlogits,
                                 int64_t workspace_row);

}  // namespace steermoe
