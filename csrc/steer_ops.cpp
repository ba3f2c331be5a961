// torch.ops.steermoe.cuda_forward / cuda_backward: schemas, argument checks, and the tensors the kernels in
// steer_kernels.cu expect (contiguous rows, fp32 parameters, outputs allocated on x's device).
//
//   cuda_forward(x (N, D), weight (E, D), bias (E,)?, vectors (E, D), scale (1,), save_gating, residual (N, D)?)
//       -> y (N, D) in x's dtype, gating (N, E) fp32, or (0, E) when save_gating is false
//      (residual: x's shape and dtype; the op then steers h = residual + x, rounded to x's dtype, never stored)
//   cuda_backward(grad_y (N, D), y (N, D), gating (N, E), weight, vectors, scale, grad_gating (N, E)?,
//                 workspace_row) -> dx (N, D) in y's dtype, dlogits (N, E) fp32, workspace (P, workspace_row) fp32
//      (grad_gating: the upstream gradient of the returned gating, when a loss uses it; the workspace's layout and
//      its reduction to dW, db, dV, ds are steermoe/workspace.py's, shared with the Triton backward)
//
// x is fp32, bf16 or fp16; the parameters fp32 or x's dtype; 1 <= E <= 64. The backward recomputes
// x (or h) = y − s·(g V), so only y and the gating are kept from the forward.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "steer.h"

namespace steermoe {
namespace {

constexpr int64_t kMaxExperts = 64;

bool is_activation_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must have shape (N, D), got ", t.sizes());
  TORCH_CHECK(is_activation_dtype(t.scalar_type()), op, ": ", name, " must be float32, bfloat16 or float16, got ",
              t.scalar_type());
  TORCH_CHECK(t.size(1) <= std::numeric_limits<int>::max(), op, ": ", name, " has too many columns (", t.size(1), ")");
}

void check_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(p.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == x.scalar_type(), op, ": ", name,
              " must be float32 or x's dtype (", x.scalar_type(), "), got ", p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), op, ": ", name, " is on ", p.device(), " but x is on ", x.device());
}

// Checks weight, vectors, scale against rows (N, D); returns E.
int64_t check_params(const char* op, const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& vectors,
                     const at::Tensor& scale) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape (E, D), got ", weight.sizes());
  const int64_t e = weight.size(0);
  TORCH_CHECK(e >= 1 && e <= kMaxExperts, op, ": the CUDA kernels support 1..", kMaxExperts, " experts, got E=", e);
  check_param(op, "weight", weight, rows, {e, rows.size(1)});
  check_param(op, "vectors", vectors, rows, {e, rows.size(1)});
  TORCH_CHECK(scale.numel() == 1 && scale.is_floating_point(), op,
              ": scale must be a 1-element floating-point tensor, got shape ", scale.sizes(), " ", scale.scalar_type());
  TORCH_CHECK(scale.device() == rows.device(), op, ": scale is on ", scale.device(), " but x is on ", rows.device());
  return e;
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> cuda_forward(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& vectors,
                                                const at::Tensor& scale, bool save_gating,
                                                const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "steermoe.cuda_forward";
  check_rows(op, "x", x);
  const int64_t e = check_params(op, x, weight, vectors, scale);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_param(op, "bias", *bias, x, {e});
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                op, ": residual must match x: ", x.scalar_type(), " ", x.sizes(), " on ", x.device(), ", got ",
                residual->scalar_type(), " ", residual->sizes(), " on ", residual->device());
  }
  const c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor rows = x.contiguous();
  const int64_t n = rows.size(0);
  const at::Tensor y = at::empty(rows.sizes(), rows.options());
  const at::Tensor gating = at::empty({save_gating ? n : 0, e}, rows.options().dtype(at::kFloat));
  if (n > 0) {
    launch_steer_forward(rows, as_f32(weight), has_bias ? as_f32(*bias) : at::Tensor(), as_f32(vectors),
                         as_f32(scale).reshape({1}), y, save_gating ? gating : at::Tensor(),
                         has_residual ? residual->contiguous() : at::Tensor());
  }
  return {y, gating};
}

void check_gating(const char* op, const char* name, const at::Tensor& g, const at::Tensor& y, int64_t e) {
  TORCH_CHECK(g.sizes() == at::IntArrayRef({y.size(0), e}) && g.is_floating_point() && g.device() == y.device(), op,
              ": ", name, " must be a floating-point tensor of shape (N, E) = (", y.size(0), ", ", e, ") on ",
              y.device(), ", got ", g.scalar_type(), " ", g.sizes(), " on ", g.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& gating, const at::Tensor& weight,
    const at::Tensor& vectors, const at::Tensor& scale, const std::optional<at::Tensor>& grad_gating,
    int64_t workspace_row) {
  constexpr const char* op = "steermoe.cuda_backward";
  check_rows(op, "y", y);
  const int64_t e = check_params(op, y, weight, vectors, scale);
  TORCH_CHECK(grad_y.sizes() == y.sizes() && grad_y.device() == y.device(), op, ": grad_y must match y ",
              y.sizes(), " on ", y.device(), ", got ", grad_y.sizes(), " on ", grad_y.device());
  check_gating(op, "gating", gating, y, e);
  const bool has_grad_gating = grad_gating.has_value() && grad_gating->defined();
  if (has_grad_gating) check_gating(op, "grad_gating", *grad_gating, y, e);
  const int64_t d = y.size(1);
  TORCH_CHECK(workspace_row >= 2 * e * d + 1, op, ": workspace_row must be at least 2·E·D + 1 = ", 2 * e * d + 1,
              ", got ", workspace_row);
  const c10::cuda::CUDAGuard guard(y.device());

  const at::Tensor rows = y.contiguous();
  const int64_t n = rows.size(0);
  const at::TensorOptions f32 = rows.options().dtype(at::kFloat);
  const at::Tensor dx = at::empty(rows.sizes(), rows.options());
  const at::Tensor dlogits = at::empty({n, e}, f32);
  if (n == 0) return {dx, dlogits, at::zeros({1, workspace_row}, f32)};
  const at::Tensor workspace = launch_steer_backward(
      grad_y.to(rows.scalar_type()).contiguous(), rows, as_f32(gating),
      has_grad_gating ? as_f32(*grad_gating) : at::Tensor(), as_f32(weight), as_f32(vectors),
      as_f32(scale).reshape({1}), dx, dlogits, workspace_row);
  return {dx, dlogits, workspace};
}

}  // namespace
}  // namespace steermoe

// A FRAGMENT: the namespace is shared with the ops steermoe/ops.py defines through torch.library. A fragment
// coexists with those in either import order, as TORCH_LIBRARY would, and also with any other library that
// defines the namespace, where a second TORCH_LIBRARY would abort the process while loading.
TORCH_LIBRARY_FRAGMENT(steermoe, m) {
  m.def("cuda_forward(Tensor x, Tensor weight, Tensor? bias, Tensor vectors, Tensor scale, bool save_gating,"
        " Tensor? residual=None) -> (Tensor y, Tensor gating)");
  m.def("cuda_backward(Tensor grad_y, Tensor y, Tensor gating, Tensor weight, Tensor vectors, Tensor scale,"
        " Tensor? grad_gating, int workspace_row) -> (Tensor dx, Tensor dlogits, Tensor workspace)");
}

TORCH_LIBRARY_IMPL(steermoe, CUDA, m) {
  m.impl("cuda_forward", &steermoe::cuda_forward);
  m.impl("cuda_backward", &steermoe::cuda_backward);
}

// `import steermoe._C` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "CUDA kernels registered as torch.ops.steermoe.cuda_*",
                               -1, nullptr};
  return PyModule_Create(&module);
}
