// Compiled once per instruction set by setup.py, with -DCPU_CAPABILITY=<ISA> and that ISA's
// flags; defines kernels_<ISA>().
#include "kernels.h"

#include <c10/util/Exception.h>

#include "../common/dtype.h"
#include "distill_kernel.h"
#include "sigmoid_ce_kernel.h"
#include "softmax_ce_kernel.h"

#ifndef CPU_CAPABILITY
#error "isa_kernels.cpp must be compiled with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

#define FL_CONCAT_IMPL(a, b) a##b
#define FL_CONCAT(a, b) FL_CONCAT_IMPL(a, b)
#define FL_STRINGIFY_IMPL(a) #a
#define FL_STRINGIFY(a) FL_STRINGIFY_IMPL(a)

namespace fusedloss {
namespace cpu {
namespace {

// The kernels' storage type of a dtype (common/dtype.h) on the CPU.
template <class D>
using storage_t = common::storage_of<D::value, c10::Half, c10::BFloat16>;

// fn(common::Dtype<dtype>{}).
template <typename Fn>
void on_dtype(ScalarType dtype, Fn&& fn) {
  const bool known = common::visit_dtype(dtype, false, [&](auto d) {
    fn(d);
    return true;
  });
  TORCH_CHECK(known, "fusedloss: unsupported dtype code ", static_cast<int>(dtype));
}

void softmax_ce_entry(const SoftmaxCEParams& p) {
  on_dtype(p.dtype, [&](auto d) { softmax_ce_dispatch_flags<storage_t<decltype(d)>>(p); });
}
void sigmoid_ce_entry(const SigmoidCEParams& p) {
  on_dtype(p.dtype, [&](auto d) { sigmoid_ce_dispatch_flags<storage_t<decltype(d)>>(p); });
}
// Student and teacher in any pair of 16/32-bit dtypes, or both float64 (one accumulation type).
void distill_entry(const DistillParams& p) {
  on_dtype(p.student_dtype, [&](auto ds) {
    on_dtype(p.teacher_dtype, [&](auto dt) {
      using student_t = storage_t<decltype(ds)>;
      using teacher_t = storage_t<decltype(dt)>;
      if constexpr (std::is_same_v<typename AccTypeOf<student_t>::type,
                                   typename AccTypeOf<teacher_t>::type>) {
        distill_launch<student_t, teacher_t>(p);
      } else {
        TORCH_CHECK(false, "fusedloss.distill: float64 logits need a float64 teacher");
      }
    });
  });
}
void scale_entry(void* data, int64_t numel, ScalarType dtype, double scale) {
  on_dtype(dtype, [&](auto d) { scale_inplace<storage_t<decltype(d)>>(data, numel, scale); });
}

}  // namespace

const KernelTable& FL_CONCAT(kernels_, CPU_CAPABILITY)() {
  static const KernelTable table{FL_STRINGIFY(CPU_CAPABILITY), &softmax_ce_entry,
                                 &sigmoid_ce_entry, &scale_entry, &distill_entry};
  return table;
}

}  // namespace cpu
}  // namespace fusedloss
