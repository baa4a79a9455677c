// Softmax cross-entropy launchers for __half logits (one storage type per file, so that the
// instantiations compile in parallel). Torch-free: CUDA headers and csrc/common only.
#include "softmax_ce.cuh"

namespace fusedloss {
namespace cuda {

int launch_softmax_ce_f16(const SoftmaxCEParams& p, const SoftmaxCEExtras& x, const DeviceInfo& d,
                            void* stream) {
  return launch_softmax_ce_t<__half>(p, x, d, stream);
}

}  // namespace cuda
}  // namespace fusedloss
