// Distillation launchers for float32 student logits (with every teacher dtype that may go with
// them; one student dtype per file, so that the instantiations compile in parallel). Torch-free:
// CUDA headers and csrc/common only.
#include "distill.cuh"

namespace fusedloss {
namespace cuda {

template int launch_distill_of<ScalarType::Float32>(const DistillParams&, void*);

}  // namespace cuda
}  // namespace fusedloss
