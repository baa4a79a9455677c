// Softmax cross-entropy launchers for float logits (one storage type per file, so that the
// instantiations compile in parallel). Torch-free: CUDA headers and csrc/common only.
#include "softmax_ce.cuh"

namespace fusedloss {
namespace cuda {

template int launch_softmax_ce_of<ScalarType::Float32>(const SoftmaxCEParams&,
                                                       const SoftmaxCEExtras&, const DeviceInfo&,
                                                       void*);

}  // namespace cuda
}  // namespace fusedloss
