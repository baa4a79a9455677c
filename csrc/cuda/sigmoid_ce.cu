// Sigmoid cross-entropy and gradient-scaling launchers, every storage type. Torch-free: CUDA
// headers and csrc/common only.
#include "sigmoid_ce.cuh"

namespace fusedloss {
namespace cuda {

int launch_sigmoid_ce(const SigmoidCEParams& p, const SigmoidCEExtras& x, void* stream) {
  return common::visit_dtype(p.dtype, -1, [&](auto d) {
    return launch_sigmoid_ce_t<storage_t<decltype(d)>>(p, x, stream);
  });
}

int launch_scale_grad(void* grad, ScalarType dtype, int64_t rows, int64_t cols, int64_t row_stride,
                      const void* scale, void* stream) {
  return common::visit_dtype(dtype, -1, [&](auto d) {
    return launch_scale_grad_t<storage_t<decltype(d)>>(grad, rows, cols, row_stride, scale, stream);
  });
}

}  // namespace cuda
}  // namespace fusedloss
