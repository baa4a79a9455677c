// The CPU kernel table. isa_kernels.cpp is compiled once per instruction set and each copy
// defines one table; the op entries pick the table for the CPU they run on.
#pragma once

#include "../common/distill.h"
#include "../common/params.h"

namespace fusedloss {
namespace cpu {

struct KernelTable {
  const char* isa;
  void (*softmax_ce)(const SoftmaxCEParams&);
  void (*sigmoid_ce)(const SigmoidCEParams&);
  void (*scale_inplace)(void* data, int64_t numel, ScalarType dtype, double scale);
  void (*distill)(const DistillParams&);
};

const KernelTable& kernels_DEFAULT();
const KernelTable& kernels_AVX2();
const KernelTable& kernels_AVX512();
const KernelTable& kernels_AVX512_BF16();

// The table for this CPU: FUSEDLOSS_CPU_ISA if set (and the CPU can run it), else torch's own
// choice (at::get_cpu_capability, which honours ATEN_CPU_CAPABILITY), AVX512 upgraded to
// AVX512_BF16 where the CPU has the bfloat16 instructions; limited to the compiled tables.
const KernelTable& kernels();

}  // namespace cpu
}  // namespace fusedloss
