// The CUDA op entries: ops_impl.h over the GPU platform (device guard, current stream, launch
// check), registered as TORCH_LIBRARY_IMPL(fusedloss, CUDA). The kernels themselves are in the
// torch-free .cu files beside this one.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <mutex>

#include "common/cuda_archs.h"
#include "ops_impl.h"

#ifndef FUSEDLOSS_CUDA_ARCHS
#define FUSEDLOSS_CUDA_ARCHS ""
#endif

namespace fusedloss {
namespace cuda {
namespace {

// Rows shorter than this are never split across blocks just to fill the GPU (the extra launch
// and the second read cost more than the idle SMs).
constexpr int64_t kMinSplitClasses = 16384;

// A device the build compiled no kernel for (an sm_70 GPU with the default 8.0;9.0+PTX build)
// gets this error on its first call, not a launch failure ("no kernel image is available").
// Asked of the driver once per device.
void check_device_supported(int dev) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<bool>, kMaxDevices> checked{};
  if (dev < 0 || dev >= kMaxDevices || checked[dev].load(std::memory_order_acquire)) return;
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  TORCH_CHECK(cuda_archs_cover(FUSEDLOSS_CUDA_ARCHS, major, minor),
              "fusedloss: cuda:", dev, " has compute capability ", major, ".", minor,
              ", and this build compiled its CUDA kernels for ", FUSEDLOSS_CUDA_ARCHS,
              " only. Rebuild for this GPU: TORCH_CUDA_ARCH_LIST=\"", major, ".", minor,
              "\" pip install --no-build-isolation -e . (docs/building.md)");
  checked[dev].store(true, std::memory_order_release);
}

struct CudaPlatform {
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {
      check_device_supported(t.device().index());
    }
  };

  static void* stream(const at::Tensor& t) {
    return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  }

  // Asked of the driver once per device (no synchronisation; safe during graph capture).
  static DeviceInfo device_info(const at::Tensor& t) {
    constexpr int kMaxDevices = 64;
    static std::array<DeviceInfo, kMaxDevices> cache{};
    static std::array<std::atomic<bool>, kMaxDevices> ready{};
    static std::mutex mutex;
    const int dev = t.device().index();
    TORCH_CHECK(dev >= 0 && dev < kMaxDevices, "fusedloss: CUDA device index ", dev, " out of range");
    if (!ready[dev].load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!ready[dev].load(std::memory_order_relaxed)) {
        int sms = 0, l2 = 0;
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
        cache[dev] = DeviceInfo{sms, l2, kMinSplitClasses};
        ready[dev].store(true, std::memory_order_release);
      }
    }
    return cache[dev];
  }

  static at::Tensor stage(const at::Tensor& t) {
    TORCH_CHECK(t.is_cuda(), "fusedloss: expected a CUDA tensor, got one on ", t.device());
    return t;
  }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }
  static void writeback(const at::Tensor&, const at::Tensor&) {}  // the kernel wrote in place

  static void check(int err, const char* op) {
    TORCH_CHECK(err >= 0, op, ": no kernel for this case (internal error ", err, ")");
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

FUSEDLOSS_REGISTER_CUDA_OPS(fusedloss, CUDA, ::fusedloss::cuda::CudaPlatform)
