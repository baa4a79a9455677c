// CPU op entries: argument checks, layouts, allocation, the denominators of the mean, and the
// deterministic final sums; the per-element work is in the ISA kernel tables (kernels.h).
#include <ATen/Parallel.h>
#include <ATen/Tensor.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <vector>

#include "../distill_entry.h"
#include "../op_outputs.h"
#include "kernels.h"
#include "output_buffer.h"

namespace fusedloss {
namespace cpu {

namespace {

bool cpu_can_run(const std::string& isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (isa == "AVX2") return avx2;
  if (isa == "AVX512") return avx512;
  if (isa == "AVX512_BF16") return avx512 && __builtin_cpu_supports("avx512bf16");
#endif
  return isa == "DEFAULT";
}

const KernelTable* compiled_table(const std::string& isa) {
#if defined(FUSEDLOSS_HAVE_AVX512_BF16)
  if (isa == "AVX512_BF16") return &kernels_AVX512_BF16();
#endif
#if defined(FUSEDLOSS_HAVE_AVX512)
  if (isa == "AVX512") return &kernels_AVX512();
#endif
#if defined(FUSEDLOSS_HAVE_AVX2)
  if (isa == "AVX2") return &kernels_AVX2();
#endif
  return isa == "DEFAULT" ? &kernels_DEFAULT() : nullptr;
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& table = []() -> const KernelTable& {
    if (const char* forced = std::getenv("FUSEDLOSS_CPU_ISA")) {
      std::string isa(forced);
      for (char& ch : isa) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      const KernelTable* t = compiled_table(isa);
      if (t != nullptr && cpu_can_run(isa)) return *t;
    }
    // Best first; torch's choice caps it (AVX512 admits AVX512_BF16, its superset).
    const char* best_first[] = {"AVX512_BF16", "AVX512", "AVX2", "DEFAULT"};
    const std::string torch_isa = at::get_cpu_capability();
    const int cap = torch_isa == "AVX512" ? 0 : torch_isa == "AVX2" ? 2 : 3;
    for (int i = cap; i < 4; ++i) {
      const KernelTable* t = compiled_table(best_first[i]);
      if (t != nullptr && cpu_can_run(best_first[i])) return *t;
    }
    return kernels_DEFAULT();
  }();
  return table;
}

namespace {

constexpr const char* kSoftmaxOp = "fusedloss.softmax_ce";
constexpr const char* kSigmoidOp = "fusedloss.sigmoid_ce";

// The small buffers of a call (per-row losses and statistics): plain allocations.
const auto kEmpty = [](at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
};

// A compensated (Neumaier) running sum: its error does not grow with the number of terms, so
// that a float64 loss summed over thousands of rows stays within an ulp or two.
struct CompensatedSum {
  double sum = 0, compensation = 0;
  void add(double v) {
    const double t = sum + v;
    compensation += std::abs(sum) >= std::abs(v) ? (sum - t) + v : (v - t) + sum;
    sum = t;
  }
  double result() const { return sum + compensation; }
};

// Sum in blocks of a fixed size, blocks added in order: the same bits for any thread count.
template <typename acc_t>
double deterministic_sum(const acc_t* v, int64_t n) {
  constexpr int64_t kBlock = 4096;
  if (n <= kBlock) {  // one block: no task to hand out, no vector of partial sums
    CompensatedSum s;
    for (int64_t i = 0; i < n; ++i) s.add(v[i]);
    return s.result();
  }
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks);
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      CompensatedSum s;
      for (int64_t i = b * kBlock, e = std::min(n, (b + 1) * kBlock); i < e; ++i) s.add(v[i]);
      partial[b] = s.result();
    }
  });
  CompensatedSum total;
  for (double s : partial) total.add(s);
  return total.result();
}

double deterministic_sum(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? deterministic_sum(t.data_ptr<double>(), t.numel())
                                        : deterministic_sum(t.data_ptr<float>(), t.numel());
}

// Values as a 1-D tensor of the accumulation dtype, written in place: a small call would
// otherwise spend more on a float64 tensor and its conversion than on its kernel.
at::Tensor acc_values(std::initializer_list<double> values, at::ScalarType acc) {
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(acc));
  int64_t i = 0;
  for (double v : values) {
    if (acc == at::kDouble) t.data_ptr<double>()[i++] = v;
    else t.data_ptr<float>()[i++] = static_cast<float>(v);
  }
  return t;
}

template <typename acc_t>
double acc_at(const c10::optional<at::Tensor>& t, int64_t i) {
  return t.has_value() ? static_cast<double>(t->data_ptr<acc_t>()[i]) : 1.0;
}

// Rejects class-index targets outside [0, classes) that are not ignore_index, naming the first.
void check_targets(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  const int64_t n = target.numel();
  std::atomic<int64_t> first_bad{n};
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if ((t[i] < 0 || t[i] >= classes) && t[i] != ignore_index) {
        int64_t cur = first_bad.load();
        while (i < cur && !first_bad.compare_exchange_weak(cur, i)) {
        }
        break;
      }
    }
  });
  const int64_t i = first_bad.load();
  TORCH_CHECK_INDEX(i == n, "fusedloss.cross_entropy: target ", t[i < n ? i : 0], " at position ",
                    i, " is out of bounds for ", classes, " classes (expected 0 <= target < ",
                    classes, ", or ignore_index=", ignore_index, ")");
}

struct SoftmaxCall : SoftmaxTensors {
  double weight_sum = 0;
  // The mean's two denominators: the weighted one of the cross-entropy part and the count of
  // valid positions (mask sum over non-ignored rows) of the z-loss part and the accuracy.
  double denominator = 0, valid_count = 0;
  at::Tensor grad_scale;  // acc_t[2]: the gradient's factors of the two parts (params.h)
};

double inverse_or_zero(double d) { return d != 0 ? 1.0 / d : 0.0; }
// A reduced value is divided (one rounding), not multiplied by the rounded inverse.
double divide_or_zero(double total, double d) { return d != 0 ? total / d : 0.0; }

// Checks and normalises the arguments shared by softmax_ce, softmax_ce_inplace and
// softmax_ce_backward, and computes the mean's denominators (or takes the caller's).
SoftmaxCall prepare_softmax(const at::Tensor& logits_in, const at::Tensor& target_in,
                            const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& mask, int64_t ignore_index,
                            int64_t reduction, double mean_eps,
                            const c10::optional<at::Tensor>& denominators,
                            int64_t class_offset = 0, int64_t global_classes = 0) {
  SoftmaxCall c;
  static_cast<SoftmaxTensors&>(c) = softmax_tensors(logits_in, target_in, weight, mask, reduction,
                                                    kSoftmaxOp, class_offset, global_classes);
  if (!c.shape.prob_target) check_targets(c.target, c.global_classes(), ignore_index);

  c.weight_sum = c.weight.has_value() ? deterministic_sum(*c.weight) : double(c.global_classes());
  if (denominators.has_value()) {
    const at::Tensor d = check_denominators(*denominators, at::kCPU, kSoftmaxOp).to(at::kDouble);
    c.denominator = d.data_ptr<double>()[0];
    c.valid_count = d.data_ptr<double>()[1];
  } else if (c.shape.prob_target) {
    c.denominator = c.mask.has_value() ? deterministic_sum(*c.mask) : double(c.shape.rows);
    c.valid_count = c.denominator;
  } else {
    const int64_t* t = c.target.data_ptr<int64_t>();
    for (int64_t i = 0; i < c.shape.rows; ++i) {
      if (t[i] == ignore_index) continue;
      const double w = c.acc == at::kDouble ? acc_at<double>(c.weight, t[i]) : acc_at<float>(c.weight, t[i]);
      const double m = c.acc == at::kDouble ? acc_at<double>(c.mask, i) : acc_at<float>(c.mask, i);
      c.denominator += m * w;
      c.valid_count += m;
    }
  }
  if (!denominators.has_value()) {
    c.denominator += mean_eps;
    c.valid_count += mean_eps;
  }
  const bool mean = c.reduction == Reduction::Mean;
  c.grad_scale = acc_values({mean ? inverse_or_zero(c.denominator) : 1.0,
                             mean ? inverse_or_zero(c.valid_count) : 1.0}, c.acc);
  return c;
}

SoftmaxCEParams softmax_params(const SoftmaxCall& c, int64_t ignore_index,
                               double label_smoothing, double z_loss, double softcap) {
  return softmax_params_of(c, ignore_index, label_smoothing, z_loss, softcap, c.weight_sum,
                           kSoftmaxOp);
}

// The forward kernel: the loss (accumulation dtype), the row statistics, the extra outputs
// (softmax_ce's schema: the z-loss part and the token accuracy), each row's first argmax (when
// want_argmax, else an empty (0,)), and the gradient into `grad` (rows with stride
// grad_row_stride) unless it is null.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_softmax_forward(
    const SoftmaxCall& c, SoftmaxCEParams p, void* grad, int64_t grad_row_stride,
    bool want_accuracy, bool want_argmax) {
  const auto acc_opts = at::TensorOptions().dtype(c.acc);
  const int64_t rows = c.shape.rows;
  // for none, the per-row extras are the extra outputs themselves
  const SoftmaxRowBuffers row = softmax_row_buffers(rows, acc_opts, kEmpty, want_argmax);
  set_softmax_forward_outputs(p, c, grad, grad_row_stride, row, want_accuracy);
  p.grad_scale = c.grad_scale.data_ptr();
  if (rows > 0) kernels().softmax_ce(p);
  if (c.reduction == Reduction::None)
    return {at::add(row.loss, row.extras[0]), row.stats, row.extras, row.argmax};
  const double z_part = p.row_z_loss ? deterministic_sum(row.extras[0]) : 0.0;
  double ce_part = deterministic_sum(row.loss), z_scaled = z_part;
  if (c.reduction == Reduction::Mean) {
    ce_part = divide_or_zero(ce_part, c.denominator);
    z_scaled = divide_or_zero(z_scaled, c.valid_count);
  }
  const double correct = p.row_correct ? deterministic_sum(row.extras[1]) : 0.0;
  return {at::scalar_tensor(ce_part + z_scaled, acc_opts), row.stats,
          acc_values({z_scaled, divide_or_zero(correct, c.valid_count)}, c.acc), row.argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& mask, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, int64_t reduction, double mean_eps, bool compute_grad,
    bool want_accuracy, const c10::optional<at::Tensor>& denominators, bool token_scaling,
    bool want_argmax) {
  SoftmaxCall c = prepare_softmax(logits, target, weight, mask, ignore_index, reduction, mean_eps,
                                  denominators);
  check_token_scaling(c, token_scaling, kSoftmaxOp);
  at::Tensor grad =
      gradient_or_empty(compute_grad, {c.shape.rows, c.shape.classes}, logits.options(), new_output);
  SoftmaxCEParams p = softmax_params(c, ignore_index, label_smoothing, z_loss, softcap);
  p.token_scaling = token_scaling;
  auto [loss, row_stats, extras, argmax] =
      run_softmax_forward(c, p, compute_grad ? grad.data_ptr() : nullptr, c.shape.classes,
                          want_accuracy, want_argmax);
  return {loss, row_stats, grad, extras, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce_inplace_cpu(
    at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& mask, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, int64_t reduction, double mean_eps, bool want_accuracy,
    const c10::optional<at::Tensor>& denominators, bool token_scaling, bool want_argmax) {
  check_softmax_inplace(logits, reduction);
  SoftmaxCall c = prepare_softmax(logits, target, weight, mask, ignore_index, reduction, mean_eps,
                                  denominators);
  check_token_scaling(c, token_scaling, kSoftmaxOp);
  SoftmaxCEParams p = softmax_params(c, ignore_index, label_smoothing, z_loss, softcap);
  p.token_scaling = token_scaling;
  return run_softmax_forward(c, p, logits.data_ptr(), logits.stride(0), want_accuracy,
                             want_argmax);
}

// softmax_ce_shard_stats: a class slice's part of each row (params.h): the loss without the
// z-loss, the statistics, and (2, rows) extras: the slice's Q (probability targets) and correct.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_ce_shard_stats_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& mask, int64_t ignore_index, double label_smoothing,
    double softcap, int64_t class_offset, int64_t global_classes, bool want_accuracy) {
  check_global_classes(global_classes);
  SoftmaxCall c = prepare_softmax(logits, target, weight, mask, ignore_index, /*reduction=*/0, 0.0,
                                  c10::nullopt, class_offset, global_classes);
  const int64_t rows = c.shape.rows, classes = c.shape.classes;
  c.weight_sum = c.weight.has_value() ? deterministic_sum(c.weight->narrow(0, class_offset, classes))
                                      : double(classes);
  const SoftmaxRowBuffers row = softmax_row_buffers(rows, at::TensorOptions().dtype(c.acc), kEmpty);
  SoftmaxCEParams p = softmax_params(c, ignore_index, label_smoothing, 0.0, softcap);
  set_shard_stats_outputs(p, c, row, want_accuracy);
  if (rows > 0) kernels().softmax_ce(p);
  return {row.loss, row.stats, row.extras};
}

at::Tensor softmax_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                   const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& mask,
                                   const at::Tensor& row_stats, int64_t ignore_index,
                                   double label_smoothing, double z_loss, double softcap,
                                   int64_t reduction, double mean_eps,
                                   const c10::optional<at::Tensor>& denominators,
                                   int64_t class_offset, int64_t global_classes,
                                   const c10::optional<at::Tensor>& row_target_mass,
                                   bool token_scaling) {
  SoftmaxCall c = prepare_softmax(logits, target, weight, mask, ignore_index, reduction, mean_eps,
                                  denominators, class_offset, global_classes);
  check_token_scaling(c, token_scaling, kSoftmaxOp);
  const at::Tensor target_mass = check_row_target_mass(c, row_target_mass, kSoftmaxOp);
  check_row_stats(row_stats, c.shape.rows, kSoftmaxOp);
  at::Tensor go = softmax_grad_loss(grad_loss, c, kSoftmaxOp);
  // the kernel reads one value per row: a reduced loss's one value is repeated
  if (c.reduction != Reduction::None) go = go.expand({c.shape.rows}).contiguous();
  at::Tensor stats_acc = row_stats.to(c.acc).contiguous();
  at::Tensor grad = new_output({c.shape.rows, c.shape.classes}, logits.options());
  SoftmaxCEParams p = softmax_params(c, ignore_index, label_smoothing, z_loss, softcap);
  p.token_scaling = token_scaling;
  set_softmax_backward_outputs(p, grad, go, stats_acc, target_mass);
  p.grad_scale = c.grad_scale.data_ptr();  // (1, 1) for none: grad_loss is per row
  if (c.shape.rows > 0) kernels().softmax_ce(p);
  return grad;
}

using SigmoidCall = SigmoidTensors;

SigmoidCall prepare_sigmoid(const at::Tensor& input, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& mask, int64_t reduction) {
  return sigmoid_tensors(input, target, weight, pos_weight, mask, reduction, kSigmoidOp);
}

// The number of elements, or the sum of the broadcast mask, for mean; 1 for sum and none.
double sigmoid_denominator(const SigmoidCall& c, int64_t numel) {
  if (c.reduction != Reduction::Mean) return 1.0;
  return c.mask.has_value() ? at::sum(*c.mask, at::kDouble).item<double>() : double(numel);
}

SigmoidCEParams sigmoid_params(const SigmoidCall& c, double label_smoothing) {
  SigmoidCEParams p = sigmoid_params_of(c, label_smoothing, kSigmoidOp);
  p.chunk_elems = kSigmoidChunkElems;
  return p;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_ce_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& pos_weight, const c10::optional<at::Tensor>& mask,
    double label_smoothing, int64_t reduction, bool compute_grad) {
  SigmoidCall c = prepare_sigmoid(input, target, weight, pos_weight, mask, reduction);
  const int64_t numel = input.numel();
  const auto acc_opts = at::TensorOptions().dtype(c.acc);
  const double denominator = sigmoid_denominator(c, numel);
  // mean: the gradient is divided by the denominator (grad_divisor); 0 when it is 0
  at::Tensor grad_scale = at::full({1}, denominator != 0 ? 1.0 : 0.0, acc_opts);
  const bool per_element = c.reduction == Reduction::None;
  at::Tensor grad =
      gradient_or_empty(compute_grad && !per_element, input.sizes(), input.options(), new_output);
  at::Tensor loss_elems = per_element ? new_output(input.sizes(), input.options().dtype(c.acc))
                                      : at::empty({0}, acc_opts);
  const int64_t chunks = (numel + kSigmoidChunkElems - 1) / kSigmoidChunkElems;
  at::Tensor chunk_loss = at::zeros({per_element ? 0 : chunks}, acc_opts);

  SigmoidCEParams p = sigmoid_params(c, label_smoothing);
  p.grad_scale = grad_scale.data_ptr();
  p.grad_divisor = c.reduction == Reduction::Mean && denominator != 0 ? denominator : 0.0;
  p.loss = per_element ? loss_elems.data_ptr() : nullptr;
  p.grad = grad.numel() ? grad.data_ptr() : nullptr;
  p.chunk_loss = per_element ? nullptr : chunk_loss.data_ptr();
  p.mode = sigmoid_forward_mode(per_element, grad.numel() != 0);
  if (numel > 0) kernels().sigmoid_ce(p);
  if (per_element) return {loss_elems, grad};
  return {at::scalar_tensor(divide_or_zero(deterministic_sum(chunk_loss), denominator), acc_opts),
          grad};
}

at::Tensor sigmoid_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                   const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& pos_weight,
                                   const c10::optional<at::Tensor>& mask, double label_smoothing,
                                   int64_t reduction) {
  SigmoidCall c = prepare_sigmoid(input, target, weight, pos_weight, mask, reduction);
  at::Tensor grad = new_output(input.sizes(), input.options());
  SigmoidCEParams p = sigmoid_params(c, label_smoothing);
  check_sigmoid_grad_loss(grad_loss, c, kSigmoidOp);
  at::Tensor go, factor;
  if (c.reduction == Reduction::None) {
    go = unit_stride_rows(grad_loss.to(input.scalar_type()));
    p.grad_loss = go.data_ptr();
    p.grad_loss_row_stride = go.stride(0);
  } else {
    const double denominator = sigmoid_denominator(c, input.numel());
    factor = grad_loss.to(c.acc).reshape({1}).mul(denominator != 0 ? 1.0 : 0.0);
    p.grad_scale = factor.data_ptr();
    p.grad_divisor = c.reduction == Reduction::Mean && denominator != 0 ? denominator : 0.0;
  }
  p.grad = grad.data_ptr();
  p.mode = SigmoidCEMode::GradFromGradLoss;
  if (input.numel() > 0) kernels().sigmoid_ce(p);
  return grad;
}

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& scale) {
  check_grad_scale(scale);
  const double s = scale.item<double>();  // a CPU tensor: no device synchronisation
  if (s == 1.0 || grad.numel() == 0) return;
  if (grad.is_contiguous()) {
    kernels().scale_inplace(grad.data_ptr(), grad.numel(),
                            kernel_dtype_of(grad, "fusedloss.scale_grad_", "grad"), s);
  } else {
    grad.mul_(s);
  }
}

// The distillation entries (distill_entry.h) on the CPU.
struct CpuDistill {
  static constexpr bool kChecksValues = true;
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static at::Tensor stage(const at::Tensor& t) { return t; }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return new_output(sizes, options);  // a gradient's buffer, kept for reuse
  }
  static void launch(const DistillParams& p, const at::Tensor&) { kernels().distill(p); }
  static void writeback(const at::Tensor&, const at::Tensor&) {}  // written in place
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("distill", &DistillOps<CpuDistill>::forward);
  m.impl("distill_backward", &DistillOps<CpuDistill>::backward);
  m.impl("distill_inplace", &DistillOps<CpuDistill>::inplace);
  m.impl("softmax_ce", &softmax_ce_cpu);
  m.impl("softmax_ce_inplace", &softmax_ce_inplace_cpu);
  m.impl("softmax_ce_backward", &softmax_ce_backward_cpu);
  m.impl("softmax_ce_shard_stats", &softmax_ce_shard_stats_cpu);
  m.impl("sigmoid_ce", &sigmoid_ce_cpu);
  m.impl("sigmoid_ce_backward", &sigmoid_ce_backward_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace cpu
}  // namespace fusedloss
