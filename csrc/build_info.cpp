// fusedloss::build_info(): what this build compiled, for `python -m fusedloss`.
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"

#ifndef FUSEDLOSS_CUDA_ARCHS
#define FUSEDLOSS_CUDA_ARCHS ""
#endif

namespace fusedloss {
namespace {

std::string build_info() {
  std::string s = "cpu_isas=" FUSEDLOSS_CPU_ISAS;
  s += "\ncpu_isa=";
  s += cpu::kernels().isa;
#if defined(FUSEDLOSS_WITH_CUDA)
  s += "\ncuda=1\ncuda_archs=" FUSEDLOSS_CUDA_ARCHS;
#else
  s += "\ncuda=0\ncuda_archs=";
#endif
  return s;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("build_info", &build_info);
}

}  // namespace fusedloss
