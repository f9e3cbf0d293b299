// Interface of the fused CPU normalization kernels (norm_cpu_kernels.cpp) to the operators that
// call them (norm_cpu_ops.cpp). What the kernels compute, in one sentence each:
//
//   norm_forward   y = γ·(x − μ)·rstd + β with μ, rstd over each statistic's set: the channels of a
//                  group of one sample (groups > 0: instance, group, layer) or one channel over the
//                  batch (groups == 0), blending batch statistics into running ones when given.
//   norm_backward  dx, dγ, dβ of norm_forward from its saved (N, C) mean and rstd tables.
//   norm_activation_forward   out = act(γ·(x − μ)·rstd + β), out may be x: norm_forward with an
//                  invertible activation in its write pass (functional/norm_act.py).
//   norm_activation_backward  dx, dγ, dβ of it from its output and rstd alone, inverting the
//                  activation and the affine map (In-Place ABN's algebra) in both read passes.
//   blend_running_stats_cpu  running ← lerp(running, batch, factor), skipping non-finite steps.
//
// The input must already be dense in the layout named by `channels_last` (layout_format); the
// operators' CPU kernels make it so. Helpers both translation units use are inline here.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace adanorm {

using OptionalTensor = c10::optional<at::Tensor>;

// The memory format the kernels read and write for `channels_last`: channels_last(_3d) by x's rank.
inline at::MemoryFormat layout_format(const at::Tensor& x, bool channels_last) {
  if (!channels_last) return at::MemoryFormat::Contiguous;
  return x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// Normalizes x (N, C, *) with statistics of x itself: per (sample, group) for groups > 0, per
// channel over the batch for groups == 0 (then updates running_mean/var in place when given).
// Returns (y in x's layout, mean, rstd) with mean and rstd as (N, C) float64 tables.
std::vector<at::Tensor> norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, int64_t groups, double eps,
                                     const c10::optional<at::Tensor>& running_mean,
                                     const c10::optional<at::Tensor>& running_var, double momentum,
                                     bool channels_last);

// The activations norm_activation_* fuse, as the operators' `activation` code: identity, a negative-side
// slope (leaky ReLU, PReLU: `parameter`, or per channel `parameter_weight`) or ELU (α = `parameter`).
constexpr int64_t kIdentity = 0, kSlope = 1, kElu = 2;

// norm_forward with groups, no running statistics, and act after the affine map, written into `out` (x's
// shape, dense in x's layout; x itself to overwrite the input). Returns (mean, rstd) as (N, C) float64 tables
// and the batch mean and unbiased variance per channel (in x's dtype, meaningful for groups == 0).
std::vector<at::Tensor> norm_activation_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& bias, int64_t groups, double eps,
                                                int64_t activation, double parameter,
                                                const c10::optional<at::Tensor>& parameter_weight, at::Tensor& out,
                                                bool channels_last);

// Gradients of norm_activation_forward from its output y and rstd table: (dx or undefined, dγ, dβ), as
// norm_backward returns them. Needs every |γ| well away from zero (the caller's check): 1/γ scales sums.
std::vector<at::Tensor> norm_activation_backward(const at::Tensor& grad_output, const at::Tensor& y,
                                                 const c10::optional<at::Tensor>& weight,
                                                 const c10::optional<at::Tensor>& bias, const at::Tensor& rstd,
                                                 int64_t groups, int64_t activation, double parameter,
                                                 const c10::optional<at::Tensor>& parameter_weight, bool channels_last,
                                                 bool need_input);

// Whether norm_activation_backward may recover x̂ = (z − β)/γ from the output: every |γ| is a normal number of
// the weight's dtype and |β| ≤ max_shift_per_scale·|γ| (true without a weight).
bool affine_invertible(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                       double max_shift_per_scale);

// dz = dy·act'(z) from the activation's output y = act(z) (grad_output itself for identity), in y's layout;
// float32/float64 y (the dtypes a fused step takes).
at::Tensor activation_input_gradient(const at::Tensor& grad_output, const at::Tensor& y, int64_t activation,
                                     double parameter, const c10::optional<at::Tensor>& parameter_weight,
                                     bool channels_last);

// A PReLU's slope gradient Σdy·z over z ≤ 0, from its output y = s·z there: one read pass of y and dy.
// `slopes` holds one slope or one per channel; the gradient has its shape and dtype. float32/float64 y.
at::Tensor slope_gradient(const at::Tensor& grad_output, const at::Tensor& y, const at::Tensor& slopes,
                          bool channels_last);

// Gradients of norm_forward given its saved (N, C) mean and rstd: (dx or undefined, dγ, dβ). dγ and dβ are
// summed in float64 and rounded once into the weight's dtype (float64 without a weight), the dtype autograd
// hands them to the parameters in: two tensor conversions per call cost more than a small layer's passes.
std::vector<at::Tensor> norm_backward(const at::Tensor& grad_output, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                      const at::Tensor& rstd, int64_t groups, bool channels_last,
                                      bool need_input);

// running ← lerp(running, batch, factor) per channel, in place, as torch.lerp computes it (factor:
// momentum_tensor when given, else momentum). With a nonfinite_skips counter, a step whose batch
// statistics hold NaN or Inf leaves the running statistics as they were and adds one to the counter.
// One call instead of the dozen tensor ops of running_stats.blend, each of which costs more than a
// small layer's kernel on the CPU.
void blend_running_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& batch_mean, const at::Tensor& batch_var, double momentum,
                             const OptionalTensor& momentum_tensor, const OptionalTensor& nonfinite_skips);

}  // namespace adanorm
