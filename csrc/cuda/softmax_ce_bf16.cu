// Softmax cross-entropy launchers for __nv_bfloat16 logits (one storage type per file, so that the
// instantiations compile in parallel). Torch-free: CUDA headers and csrc/common only.
#include "softmax_ce.cuh"

namespace fusedloss {
namespace cuda {

template int launch_softmax_ce_of<ScalarType::BFloat16>(const SoftmaxCEParams&,
                                                        const SoftmaxCEExtras&, const DeviceInfo&,
                                                        void*);

}  // namespace cuda
}  // namespace fusedloss
