// Large CPU outputs (gradients, per-element losses) that a kernel writes in full.
#pragma once

#include <ATen/core/Tensor.h>

namespace fusedloss {
namespace cpu {

// An uninitialised tensor for a kernel to overwrite. Buffers of several MB are backed by
// transparent huge pages and, once freed, one of them is kept for the next call of the same
// size: a fresh N x C buffer would otherwise be faulted in 4 KB at a time on every training
// step, which costs more than the kernel that fills it.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Returns the kept buffers to the system (fusedloss.empty_cache()).
void release_cached_outputs();

// Bytes currently kept.
int64_t cached_output_bytes();

}  // namespace cpu
}  // namespace fusedloss
