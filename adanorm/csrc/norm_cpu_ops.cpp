// The adanorm operators: schemas, CPU kernels (adapters from the schema to the kernels of
// norm_cpu_kernels.h), autograd, and the tracer kernel of native_group_norm.
//
// adanorm::fused_norm and adanorm::native_group_norm are torch operators (TORCH_LIBRARY at the end),
// with CPU, Autograd and (for native_group_norm) Tracer kernels here and fake kernels in
// adanorm/functional/cpu_ops.py, so that FakeTensor, torch.compile, AOTAutograd, torch.export and
// torch.jit.trace see one operator with known output shapes. The autograd kernel of fused_norm runs
// the internal operators _fused_norm_forward/_fused_norm_backward through the dispatcher, so those
// tools trace its forward and backward as operators too. FusedNorm wires both directions of the
// fused kernels into autograd; NativeGroupNorm wires PyTorch's own group norm kernels in with a
// backward that cannot crash.

#include "norm_cpu_kernels.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <utility>

namespace {

using adanorm::layout_format;
using adanorm::OptionalTensor;

c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

bool requires_grad(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); }

// Channels-last when the input is dense in channels_last(_3d) and not also plain contiguous, or a
// strided view that PyTorch's own kernels lay out channels-last (suggest_memory_format), so the
// output has the layout native norms give it; anything else is made contiguous (a no-op for
// convolution outputs). The fake kernels in cpu_ops.py (_dense_format) mirror this rule.
std::pair<at::Tensor, bool> dense_layout(const at::Tensor& input) {
  if (input.dim() >= 4 && !input.is_contiguous()) {
    const at::MemoryFormat channels_last = layout_format(input, true);
    if (input.is_contiguous(channels_last)) return {input, true};
    if (input.suggest_memory_format() == channels_last) return {input.contiguous(channels_last), true};
  }
  return {input.contiguous(), false};
}

// ---- CPU kernels of the operators: real tensors only (they read sizes and data) -------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_norm_forward_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t groups, double eps, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum) {
  // Geometry divides by N·C: an empty batch (nothing to normalize) is the callers' to pass through.
  TORCH_CHECK(input.numel() > 0, "adanorm CPU kernel: input of shape ", input.sizes(), " is empty");
  const auto [x, channels_last] = dense_layout(input);
  auto results = adanorm::norm_forward(x, weight, bias, groups, eps, running_mean, running_var, momentum, channels_last);
  return {std::move(results[0]), std::move(results[1]), std::move(results[2])};
}

at::Tensor fused_norm_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, int64_t groups, double eps,
                          const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                          double momentum) {
  return std::get<0>(fused_norm_forward_cpu(input, weight, bias, groups, eps, running_mean, running_var, momentum));
}

// (dx, or undefined unless need_input; dγ and dβ in the weight's dtype, float64 without one) given the
// forward's saved (N, C) tables.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t groups, bool need_input) {
  const auto [x, channels_last] = dense_layout(input);
  const at::Tensor dy = grad_output.contiguous(layout_format(x, channels_last));
  auto results = adanorm::norm_backward(dy, x, weight, mean, rstd, groups, channels_last, need_input);
  return {std::move(results[0]), std::move(results[1]), std::move(results[2])};
}

// The fused norm + activation's kernels (functional/norm_act.py calls them from its autograd.Function in
// eager code): `out` is dense in the layout dense_layout gives the input, or the input itself.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_activation_forward_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t groups, double eps, int64_t activation, double parameter, const c10::optional<at::Tensor>& parameter_weight,
    at::Tensor& out) {
  TORCH_CHECK(input.numel() > 0, "adanorm CPU kernel: input of shape ", input.sizes(), " is empty");
  const auto [x, channels_last] = dense_layout(input);
  auto results =
      adanorm::norm_activation_forward(x, weight, bias, groups, eps, activation, parameter, parameter_weight, out, channels_last);
  return {std::move(results[0]), std::move(results[1]), std::move(results[2]), std::move(results[3])};
}

// (dx or undefined, dγ, dβ, the PReLU slopes' gradient or undefined). From the output alone where `input` is
// absent; where the forward kept it (an affine map backward cannot invert), through the plain norm's backward
// from the input and its mean table, with dz recovered from the output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_activation_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& output, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& rstd, int64_t groups, int64_t activation, double parameter,
    const c10::optional<at::Tensor>& parameter_weight, const c10::optional<at::Tensor>& input,
    const c10::optional<at::Tensor>& mean, bool need_input, bool need_parameter_weight) {
  const auto [y, channels_last] = dense_layout(output);
  const at::Tensor dy = grad_output.contiguous(layout_format(y, channels_last));
  std::vector<at::Tensor> results;
  if (input.has_value() && input->defined()) {
    TORCH_CHECK(mean.has_value() && mean->defined(), "adanorm CPU kernel: backward from the input needs its mean table");
    const at::Tensor x = input->contiguous(layout_format(y, channels_last));
    const at::Tensor grad_z = adanorm::activation_input_gradient(dy, y, activation, parameter, parameter_weight, channels_last);
    results = adanorm::norm_backward(grad_z, x, weight, *mean, rstd, groups, channels_last, need_input);
  } else {
    results = adanorm::norm_activation_backward(dy, y, weight, bias, rstd, groups, activation, parameter,
                                                parameter_weight, channels_last, need_input);
  }
  at::Tensor grad_slopes;
  if (need_parameter_weight) {
    TORCH_CHECK(parameter_weight.has_value() && parameter_weight->defined(),
                "adanorm CPU kernel: a slope gradient needs the slopes (parameter_weight)");
    grad_slopes = adanorm::slope_gradient(dy, y, *parameter_weight, channels_last);
  }
  return {std::move(results[0]), std::move(results[1]), std::move(results[2]), grad_slopes};
}

// Reached below autograd only (inference mode): there no backward can crash.
at::Tensor native_group_norm_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t groups, double eps) {
  return at::group_norm(input, groups, weight, bias, eps, false);
}

// ---- Autograd: the kernels above reached through the dispatcher, so that FakeTensor, AOTAutograd
// and the tracers see the operators (and their fake kernels) instead of running them. Code above
// the CPU kernels reads no sizes: under torch.compile they may be symbolic. -------------------------

using FusedNormSignature = at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, int64_t, double,
                                      const OptionalTensor&, const OptionalTensor&, double);
using FusedNormForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, int64_t, double, const OptionalTensor&,
    const OptionalTensor&, double);
using FusedNormBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&, int64_t, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::TypedOperatorHandle<FusedNormSignature>& fused_norm_op() {
  static const auto op = find_op<FusedNormSignature>("adanorm::fused_norm");
  return op;
}
const c10::TypedOperatorHandle<FusedNormForwardSignature>& fused_norm_forward_op() {
  static const auto op = find_op<FusedNormForwardSignature>("adanorm::_fused_norm_forward");
  return op;
}
const c10::TypedOperatorHandle<FusedNormBackwardSignature>& fused_norm_backward_op() {
  static const auto op = find_op<FusedNormBackwardSignature>("adanorm::_fused_norm_backward");
  return op;
}

// Which of a Function's leading tensor arguments (the input first, then optional ones, undefined where absent)
// backward must differentiate: absent optional arguments have no graph edge, so edge indices skip them.
template <size_t N>
std::array<bool, N> needed_gradients(torch::autograd::AutogradContext* ctx,
                                     const std::array<const at::Tensor*, N>& arguments) {
  std::array<bool, N> need{};
  for (size_t i = 0, edge = 0; i < N; ++i) {
    if (i == 0 || arguments[i]->defined()) need[i] = ctx->needs_input_grad(edge++);
  }
  return need;
}

// What FusedNorm and NativeGroupNorm both keep from forward for backward: the arguments a native op
// needs to recompute the output (differentiable_gradients) and the forward's (N, G) statistics.
struct SavedNorm {
  at::Tensor input, weight, bias;  // weight, bias undefined where absent
  at::Tensor mean, rstd;
  int64_t groups;  // 0: batch statistics
  double eps;
  std::array<bool, 3> need;  // which of (input, weight, bias) get a gradient

  static void save(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const OptionalTensor& weight,
                   const OptionalTensor& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
                   double eps) {
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
  }

  static SavedNorm load(torch::autograd::AutogradContext* ctx) {
    auto saved = ctx->get_saved_variables();
    const auto need = needed_gradients<3>(ctx, {&saved[0], &saved[1], &saved[2]});
    return {std::move(saved[0]),
            std::move(saved[1]),
            std::move(saved[2]),
            std::move(saved[3]),
            std::move(saved[4]),
            ctx->saved_data["groups"].toInt(),
            ctx->saved_data["eps"].toDouble(),
            need};
  }
};

// Gradients that must themselves be differentiable (create_graph=True, e.g. gradient penalties):
// recomputed through the native ops, which autograd can differentiate twice (with grad mode on,
// native group norm's backward is its composite formula, not the kernel NativeGroupNorm avoids).
// The list has `edges` entries, as forward has arguments.
torch::autograd::variable_list differentiable_gradients(const SavedNorm& saved, const at::Tensor& grad_output,
                                                        size_t edges) {
  const at::Tensor output =
      saved.groups == 0
          ? at::batch_norm(saved.input, saved.weight, saved.bias, {}, {}, true, 0.0, saved.eps, false)
          : at::group_norm(saved.input, saved.groups, saved.weight, saved.bias, saved.eps, false);
  const std::array<const at::Tensor*, 3> arguments = {&saved.input, &saved.weight, &saved.bias};
  torch::autograd::variable_list wanted;
  for (int i = 0; i < 3; ++i)
    if (saved.need[i]) wanted.push_back(*arguments[i]);
  const auto computed = torch::autograd::grad({output}, wanted, {grad_output}, true, true);
  torch::autograd::variable_list grads(edges);
  for (int i = 0, k = 0; i < 3; ++i)
    if (saved.need[i]) grads[i] = computed[k++];
  return grads;
}

// Autograd in C++: the Python-level autograd.Function cost more per call than small layers' kernels.
struct FusedNorm : public torch::autograd::Function<FusedNorm> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            const OptionalTensor& weight, const OptionalTensor& bias, int64_t groups, double eps,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var, double momentum) {
    at::Tensor output, mean, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, mean, rstd) =
          fused_norm_forward_op().call(input, weight, bias, groups, eps, running_mean, running_var, momentum);
    }
    SavedNorm::save(ctx, input, weight, bias, mean, rstd, groups, eps);
    return output;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const SavedNorm saved = SavedNorm::load(ctx);
    if (at::GradMode::is_enabled()) return differentiable_gradients(saved, grad_outputs[0], 8);
    at::Tensor grad_input, grad_weight, grad_bias;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grad_input, grad_weight, grad_bias) = fused_norm_backward_op().call(
          grad_outputs[0], saved.input, present(saved.weight), saved.mean, saved.rstd, saved.groups, saved.need[0]);
    }
    torch::autograd::variable_list grads(8);
    if (saved.need[0]) grads[0] = grad_input;
    if (saved.need[1]) grads[1] = grad_weight;  // already in the weight's dtype
    if (saved.need[2]) grads[2] = grad_bias.scalar_type() == saved.bias.scalar_type() ? grad_bias
                                                                                   : grad_bias.to(saved.bias.scalar_type());
    return grads;
  }
};

// Native group norm (PyTorch's own kernels, so the same numbers) with a backward that always asks
// for the input gradient. torch 2.13's channels-last CPU backward kernel crashes the process when
// asked for γ/β gradients without the input's: a frozen input, or torch.autograd.grad over the
// parameters only. Computing an unwanted input gradient costs one pass; the native autograd node
// offers no way around the crash, and a Python-level autograd.Function costs more than small calls.
// Sizes are symbolic-safe (sym_size): under AOTAutograd this runs on fake tensors.
struct NativeGroupNorm : public torch::autograd::Function<NativeGroupNorm> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            const OptionalTensor& weight, const OptionalTensor& bias, int64_t groups, double eps) {
    const at::Tensor x = input.contiguous(input.suggest_memory_format());  // as at::group_norm
    auto [y, mean, rstd] =
        at::native_group_norm_symint(x, weight, bias, x.sym_size(0), x.sym_size(1), spatial_size(x), groups, eps);
    SavedNorm::save(ctx, input, weight, bias, mean, rstd, groups, eps);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const SavedNorm saved = SavedNorm::load(ctx);
    if (at::GradMode::is_enabled()) return differentiable_gradients(saved, grad_outputs[0], 5);
    const at::Tensor x = saved.input.contiguous(saved.input.suggest_memory_format());
    auto [dx, dw, db] = at::native_group_norm_backward_symint(
        grad_outputs[0].contiguous(x.suggest_memory_format()), x, saved.mean, saved.rstd, saved.weight,
        x.sym_size(0), x.sym_size(1), spatial_size(x), saved.groups, {true, saved.need[1], saved.need[2]});
    torch::autograd::variable_list grads(5);
    if (saved.need[0]) grads[0] = dx;
    if (saved.need[1]) grads[1] = dw;
    if (saved.need[2]) grads[2] = db;
    return grads;
  }

  static c10::SymInt spatial_size(const at::Tensor& x) {
    c10::SymInt size = 1;
    for (const c10::SymInt& extent : x.sym_sizes().slice(2)) size = size * extent;
    return size;
  }
};

// ---- The fused norm + activation in autograd (functional/norm_act.py calls adanorm::norm_activation or its
// in-place form from eager code with grad enabled; captured code never reaches them) -------------------------

using NormActivationForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, int64_t, double, int64_t, double,
    const OptionalTensor&, at::Tensor&);
using NormActivationBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&, int64_t,
    int64_t, double, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, bool, bool);

const c10::TypedOperatorHandle<NormActivationForwardSignature>& norm_activation_forward_op() {
  static const auto op = find_op<NormActivationForwardSignature>("adanorm::_norm_activation_forward");
  return op;
}
const c10::TypedOperatorHandle<NormActivationBackwardSignature>& norm_activation_backward_op() {
  static const auto op = find_op<NormActivationBackwardSignature>("adanorm::_norm_activation_backward");
  return op;
}

// One fused step's results: the output (the input itself where written in place), the (N, C) mean and rstd
// tables, the batch mean and unbiased variance per channel in the input's dtype, and the input as it was
// before the step where `keep_input` asked for it (a copy where the step overwrote it).
struct NormActivationStep {
  at::Tensor output, mean, rstd, batch_mean, batch_var, kept_input;
};

NormActivationStep norm_activation_step(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                        const OptionalTensor& parameter_weight, int64_t groups, double eps,
                                        int64_t activation, double parameter, bool in_place, bool keep_input) {
  TORCH_CHECK(input.numel() > 0, "adanorm CPU kernel: input of shape ", input.sizes(), " is empty");
  const auto [x, channels_last] = dense_layout(input);
  const bool write_into_x = in_place && x.is_same(input);
  NormActivationStep step;
  if (keep_input) step.kept_input = write_into_x ? x.clone(layout_format(x, channels_last)) : x;
  step.output = write_into_x ? x : at::empty_like(x, layout_format(x, channels_last));
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(step.mean, step.rstd, step.batch_mean, step.batch_var) = norm_activation_forward_op().call(
        x, weight, bias, groups, eps, activation, parameter, parameter_weight, step.output);
  }
  if (in_place && !write_into_x) {  // an input the kernels do not address in place (a strided view): copied back
    input.copy_(step.output);
    step.output = input;
  }
  return step;
}

// Saves the output, γ, β, the PReLU slopes and the rstd table; the input and its mean table too where the
// affine map cannot be inverted (affine_invertible), and then backward is the plain norm's from the input.
struct NormActivation : public torch::autograd::Function<NormActivation> {
  static constexpr int64_t kArguments = 10;

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                                                const OptionalTensor& weight, const OptionalTensor& bias,
                                                const OptionalTensor& parameter_weight, int64_t groups, double eps,
                                                int64_t activation, double parameter, double max_shift_per_scale,
                                                bool in_place) {
    const bool invertible = adanorm::affine_invertible(weight, bias, max_shift_per_scale);
    NormActivationStep step = norm_activation_step(input, weight, bias, parameter_weight, groups, eps, activation,
                                                   parameter, in_place, !invertible);
    if (in_place) ctx->mark_dirty({input});
    ctx->mark_non_differentiable({step.batch_mean, step.batch_var});
    ctx->save_for_backward({step.output, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            parameter_weight.value_or(at::Tensor()), step.rstd, step.kept_input,
                            invertible ? at::Tensor() : step.mean});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["parameter"] = parameter;
    return {step.output, step.batch_mean, step.batch_var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &output = saved[0], &weight = saved[1], &bias = saved[2], &slopes = saved[3];
    const auto need = needed_gradients<4>(ctx, {&output, &weight, &bias, &slopes});
    auto [grad_input, grad_weight, grad_bias, grad_slopes] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::NoGradGuard first_order_only;  // the gradients themselves are not differentiable (below)
      return norm_activation_backward_op().call(
          grad_outputs[0], output, present(weight), present(bias), saved[4], ctx->saved_data["groups"].toInt(),
          ctx->saved_data["activation"].toInt(), ctx->saved_data["parameter"].toDouble(), present(slopes),
          present(saved[5]), present(saved[6]), need[0], need[3]);
    }();
    torch::autograd::variable_list grads(kArguments);
    if (need[0]) grads[0] = grad_input;
    if (need[1]) grads[1] = grad_weight;  // in the weight's dtype
    if (need[2]) grads[2] = grad_bias.scalar_type() == bias.scalar_type() ? grad_bias : grad_bias.to(bias.scalar_type());
    if (need[3]) grads[3] = grad_slopes;
    if (!at::GradMode::is_enabled() || !grad_outputs[0].requires_grad()) return grads;
    // create_graph=True: the input these gradients would need was overwritten or never kept, so a second
    // differentiation through them raises where it is attempted, as PyTorch's once_differentiable functions do
    // (the gradients are marked as requiring grad so that the error node is their grad_fn).
    for (at::Tensor& grad : grads) {
      if (grad.defined()) grad = grad.detach().requires_grad_();
    }
    auto error = std::make_shared<torch::autograd::DelayedError>(
        "adanorm: a fused norm + activation (AdaptiveNormAct, convert(fuse_activation=True)) cannot be "
        "differentiated twice: it keeps only its output. Use the unfused layers (convert(model) without "
        "fuse_activation, or adanorm.revert) for gradient penalties and other double backward.",
        kArguments);
    return (*error)(std::move(grads));
  }
};

// The checks live here rather than in Python, where they cost more than a small call's kernels.
at::Tensor fused_norm_autograd(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                               int64_t groups, double eps, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, double momentum) {
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    // Inference (no_grad, sliding-window prediction): no graph node, nothing saved.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return fused_norm_op().call(input, weight, bias, groups, eps, running_mean, running_var, momentum);
  }
  return FusedNorm::apply(input, weight, bias, groups, eps, running_mean, running_var, momentum);
}

at::Tensor native_group_norm_autograd(const at::Tensor& input, const OptionalTensor& weight,
                                      const OptionalTensor& bias, int64_t groups, double eps) {
  if (!at::GradMode::is_enabled() || !(requires_grad(weight) || requires_grad(bias)) ||
      at::autocast::is_autocast_enabled(at::kCPU)) {
    // No parameter gradient for the crashing kernel to compute; or autocast's dtype policy, which
    // must see the native op itself.
    return at::group_norm(input, groups, weight, bias, eps, false);
  }
  return NativeGroupNorm::apply(input, weight, bias, groups, eps);
}

bool any_requires_grad(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                       const OptionalTensor& parameter_weight) {
  return input.requires_grad() || requires_grad(weight) || requires_grad(bias) || requires_grad(parameter_weight);
}

// adanorm::norm_activation and adanorm::norm_activation_: below autograd (no graph), and in autograd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_activation_cpu(
    const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& parameter_weight, int64_t groups, double eps, int64_t activation, double parameter,
    double /*max_shift_per_scale*/) {
  auto step = norm_activation_step(input, weight, bias, parameter_weight, groups, eps, activation, parameter, false, false);
  return {step.output, step.batch_mean, step.batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_activation_inplace_cpu(
    at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& parameter_weight,
    int64_t groups, double eps, int64_t activation, double parameter, double /*max_shift_per_scale*/) {
  auto step = norm_activation_step(input, weight, bias, parameter_weight, groups, eps, activation, parameter, true, false);
  return {input, step.batch_mean, step.batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_activation_step_autograd(
    const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& parameter_weight, int64_t groups, double eps, int64_t activation, double parameter,
    double max_shift_per_scale, bool in_place) {
  if (!at::GradMode::is_enabled() || !any_requires_grad(input, weight, bias, parameter_weight)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto step = norm_activation_step(input, weight, bias, parameter_weight, groups, eps, activation, parameter,
                                     in_place, false);
    if (in_place) torch::autograd::impl::bump_version(input);
    return {step.output, step.batch_mean, step.batch_var};
  }
  auto outputs = NormActivation::apply(input, weight, bias, parameter_weight, groups, eps, activation, parameter,
                                       max_shift_per_scale, in_place);
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_activation_autograd(
    const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& parameter_weight, int64_t groups, double eps, int64_t activation, double parameter,
    double max_shift_per_scale) {
  return norm_activation_step_autograd(input, weight, bias, parameter_weight, groups, eps, activation, parameter,
                                       max_shift_per_scale, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_activation_inplace_autograd(
    at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& parameter_weight,
    int64_t groups, double eps, int64_t activation, double parameter, double max_shift_per_scale) {
  return norm_activation_step_autograd(input, weight, bias, parameter_weight, groups, eps, activation, parameter,
                                       max_shift_per_scale, true);
}

// While torch.jit.trace (or ONNX export) records: the native op, which every runtime of a traced
// graph knows, instead of adanorm's.
at::Tensor native_group_norm_traced(const at::Tensor& input, const OptionalTensor& weight,
                                    const OptionalTensor& bias, int64_t groups, double eps) {
  return at::group_norm(input, groups, weight, bias, eps, false);
}

}  // namespace

// The operators. Running statistics are mutated inputs (a!, b!): batch mode (groups = 0) blends
// the batch's statistics into them in place. Fake kernels (shapes and layouts only) are registered
// from Python by the module named here, which FakeTensor imports when it meets an operator first.
TORCH_LIBRARY(adanorm, m) {
  m.set_python_module("adanorm.functional.cpu_ops");
  m.def(
      "fused_norm(Tensor input, Tensor? weight, Tensor? bias, int groups, float eps, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("native_group_norm(Tensor input, Tensor? weight, Tensor? bias, int groups, float eps) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // What the autograd kernel of fused_norm runs: the forward also returns the (N, C) float64 mean
  // and rstd tables it saves; the backward returns (dx or None, dγ, dβ), dγ and dβ in the weight's dtype
  // (float64 without a weight).
  m.def(
      "_fused_norm_forward(Tensor input, Tensor? weight, Tensor? bias, int groups, float eps, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_fused_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor rstd, int groups, "
      "bool need_input) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The fused norm + activation (norm_cpu_kernels.h, norm_activation_*): activation 0 identity, 1 slope,
  // 2 ELU. The forward writes into `out` and returns the (N, C) float64 mean and rstd tables and the
  // per-channel batch mean and unbiased variance (the input's dtype); the backward reads the output, not the input.
  m.def(
      "_norm_activation_forward(Tensor input, Tensor? weight, Tensor? bias, int groups, float eps, int activation, "
      "float parameter, Tensor? parameter_weight, Tensor(a!) out) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_norm_activation_backward(Tensor grad_output, Tensor output, Tensor? weight, Tensor? bias, Tensor rstd, "
      "int groups, int activation, float parameter, Tensor? parameter_weight, Tensor? input, Tensor? mean, "
      "bool need_input, bool need_parameter_weight) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The fused step with autograd: (output, batch mean, unbiased batch variance), the two vectors in the input's
  // dtype and not differentiable. Backward keeps the output, not the input, where |β| ≤ max_shift_per_scale·|γ|
  // in every channel. norm_activation_ writes the output into the input (the caller's promise: nothing else
  // reads it afterwards). Eager code only: their autograd kernel reads γ and β to choose what to save, and
  // captured code runs the native norm and activation instead (functional/norm_act.py).
  m.def(
      "norm_activation(Tensor input, Tensor? weight, Tensor? bias, Tensor? parameter_weight, int groups, float eps, "
      "int activation, float parameter, float max_shift_per_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "norm_activation_(Tensor(a!) input, Tensor? weight, Tensor? bias, Tensor? parameter_weight, int groups, "
      "float eps, int activation, float parameter, float max_shift_per_scale) -> (Tensor(a!), Tensor, Tensor)");
  m.def(
      "blend_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor batch_mean, Tensor batch_var, "
      "float momentum, Tensor? momentum_tensor, Tensor(c!)? nonfinite_skips) -> ()",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(adanorm, CPU, m) {
  m.impl("blend_running_stats", adanorm::blend_running_stats_cpu);
  m.impl("fused_norm", fused_norm_cpu);
  m.impl("native_group_norm", native_group_norm_cpu);
  m.impl("_fused_norm_forward", fused_norm_forward_cpu);
  m.impl("_fused_norm_backward", fused_norm_backward_cpu);
  m.impl("_norm_activation_forward", norm_activation_forward_cpu);
  m.impl("_norm_activation_backward", norm_activation_backward_cpu);
  m.impl("norm_activation", norm_activation_cpu);
  m.impl("norm_activation_", norm_activation_inplace_cpu);
}

TORCH_LIBRARY_IMPL(adanorm, Autograd, m) {
  m.impl("fused_norm", fused_norm_autograd);
  m.impl("native_group_norm", native_group_norm_autograd);
  m.impl("norm_activation", norm_activation_autograd);
  m.impl("norm_activation_", norm_activation_inplace_autograd);
}

TORCH_LIBRARY_IMPL(adanorm, Tracer, m) {
  m.impl("native_group_norm", native_group_norm_traced);
}
