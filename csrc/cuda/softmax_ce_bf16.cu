// Softmax cross-entropy launchers for __nv_bfloat16 logits (one storage type per file, so that the
// instantiations compile in parallel). Torch-free: CUDA headers and csrc/common only.
#include "softmax_ce.cuh"

namespace fusedloss {
namespace cuda {

int launch_softmax_ce_bf16(const SoftmaxCEParams& p, const SoftmaxCEExtras& x, const DeviceInfo& d,
                            void* stream) {
  return launch_softmax_ce_t<__nv_bfloat16>(p, x, d, stream);
}

}  // namespace cuda
}  // namespace fusedloss
