// The ops without tensors: build_info (what this build compiled, for `python -m fusedloss`)
// and the CPU output-buffer cache's controls.
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"
#include "cpu/output_buffer.h"

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

void empty_cache() { cpu::release_cached_outputs(); }

int64_t cached_bytes() { return cpu::cached_output_bytes(); }

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("build_info", &build_info);
  m.impl("empty_cache", &empty_cache);
  m.impl("cached_bytes", &cached_bytes);
}

}  // namespace fusedloss
