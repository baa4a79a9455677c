// Compiled once per instruction set by setup.py, with -DCPU_CAPABILITY=<ISA> and that ISA's
// flags; defines kernels_<ISA>().
#include "kernels.h"

#include <c10/util/Exception.h>

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

template <template <typename> class Fn, typename... Args>
void dispatch_dtype(ScalarType dtype, Args&&... args) {
  switch (dtype) {
    case ScalarType::Float16: return Fn<c10::Half>::run(args...);
    case ScalarType::BFloat16: return Fn<c10::BFloat16>::run(args...);
    case ScalarType::Float32: return Fn<float>::run(args...);
    case ScalarType::Float64: return Fn<double>::run(args...);
  }
  TORCH_CHECK(false, "fusedloss: unsupported dtype code ", static_cast<int>(dtype));
}

template <typename scalar_t>
struct SoftmaxFn {
  static void run(const SoftmaxCEParams& p) { softmax_ce_dispatch_flags<scalar_t>(p); }
};
template <typename scalar_t>
struct SigmoidFn {
  static void run(const SigmoidCEParams& p) { sigmoid_ce_dispatch_flags<scalar_t>(p); }
};
template <typename scalar_t>
struct ScaleFn {
  static void run(void* data, int64_t numel, double scale) {
    scale_inplace<scalar_t>(data, numel, scale);
  }
};

void softmax_ce_entry(const SoftmaxCEParams& p) { dispatch_dtype<SoftmaxFn>(p.dtype, p); }
void sigmoid_ce_entry(const SigmoidCEParams& p) { dispatch_dtype<SigmoidFn>(p.dtype, p); }
void scale_entry(void* data, int64_t numel, ScalarType dtype, double scale) {
  dispatch_dtype<ScaleFn>(dtype, data, numel, scale);
}

}  // namespace

const KernelTable& FL_CONCAT(kernels_, CPU_CAPABILITY)() {
  static const KernelTable table{FL_STRINGIFY(CPU_CAPABILITY), &softmax_ce_entry,
                                 &sigmoid_ce_entry, &scale_entry};
  return table;
}

}  // namespace cpu
}  // namespace fusedloss
