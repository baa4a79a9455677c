// Sigmoid cross-entropy and gradient-scaling launchers, every storage type. Torch-free: CUDA
// headers and csrc/common only.
#include "sigmoid_ce.cuh"

namespace fusedloss {
namespace cuda {

int launch_sigmoid_ce(const SigmoidCEParams& p, const SigmoidCEExtras& x, void* stream) {
  switch (p.dtype) {
    case ScalarType::Float16: return launch_sigmoid_ce_t<__half>(p, x, stream);
    case ScalarType::BFloat16: return launch_sigmoid_ce_t<__nv_bfloat16>(p, x, stream);
    case ScalarType::Float32: return launch_sigmoid_ce_t<float>(p, x, stream);
    case ScalarType::Float64: return launch_sigmoid_ce_t<double>(p, x, stream);
  }
  return -1;
}

int launch_scale_grad(void* grad, ScalarType dtype, int64_t rows, int64_t cols, int64_t row_stride,
                      const void* scale, void* stream) {
  switch (dtype) {
    case ScalarType::Float16: return launch_scale_grad_t<__half>(grad, rows, cols, row_stride, scale, stream);
    case ScalarType::BFloat16:
      return launch_scale_grad_t<__nv_bfloat16>(grad, rows, cols, row_stride, scale, stream);
    case ScalarType::Float32: return launch_scale_grad_t<float>(grad, rows, cols, row_stride, scale, stream);
    case ScalarType::Float64: return launch_scale_grad_t<double>(grad, rows, cols, row_stride, scale, stream);
  }
  return -1;
}

}  // namespace cuda
}  // namespace fusedloss
