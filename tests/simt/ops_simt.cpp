// The emulated CUDA ops: csrc/cuda/ops_impl.h (the same entry logic as ops_cuda.cpp) over the
// SIMT platform, registered as TORCH_LIBRARY_IMPL(fusedloss_simt, CPU). Every tensor a kernel
// touches is a guard-paged copy (inputs) or a guard-paged allocation (outputs, workspaces);
// see simt.h. Also the control ops of the harness, for the tests.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cstring>
#include <sstream>

#include "../../csrc/cuda/ops_impl.h"
#include "simt.h"

namespace fusedloss {
namespace cuda {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << t.sizes();
  return s.str();
}

at::Tensor wrap(void* data, at::IntArrayRef sizes, at::IntArrayRef strides,
                const at::TensorOptions& options) {
  return at::from_blob(
      data, sizes, strides, [](void* p) { fl_simt::guarded_free(p); },
      options.device(at::kCPU));
}

struct SimtPlatform {
  struct Guard {
    explicit Guard(const at::Tensor& t) {
      TORCH_CHECK(t.device().is_cpu(), "fusedloss_simt: the emulated kernels take CPU tensors, got ",
                  t.device());
    }
  };

  static void* stream(const at::Tensor&) { return nullptr; }

  static DeviceInfo device_info(const at::Tensor&) {
    const fl_simt::Config& c = fl_simt::config();
    return DeviceInfo{c.num_sms, c.l2_bytes, c.min_split_classes};
  }

  // A guard-paged copy of exactly the bytes the view spans, at the same 16-byte phase.
  static at::Tensor stage(const at::Tensor& t) {
    if (t.numel() == 0) return t;
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK(t.stride(d) >= 0, "fusedloss_simt: negative strides are not supported");
      last += (t.size(d) - 1) * t.stride(d);
    }
    const size_t bytes = static_cast<size_t>(last + 1) * t.element_size();
    const auto residue = static_cast<unsigned>(reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u);
    const size_t dense = static_cast<size_t>(t.numel()) * t.element_size();
    if (bytes > (size_t(64) << 20) && bytes > 4 * dense) {
      // A sparse view (rows far apart, e.g. 64-bit offsets tested with a few rows): reserve
      // the span, copy the elements only.
      void* data = fl_simt::guarded_alloc_sparse(bytes, residue, describe(t).c_str());
      at::Tensor copy = wrap(data, t.sizes(), t.strides(), t.options());
      copy.copy_(t);
      return copy;
    }
    void* data = fl_simt::guarded_alloc(bytes, residue, describe(t).c_str());
    std::memcpy(data, t.data_ptr(), bytes);
    return wrap(data, t.sizes(), t.strides(), t.options());
  }

  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(options.dtype().toScalarType());
    std::ostringstream name;
    name << "output " << options.dtype() << sizes;
    void* data = fl_simt::guarded_alloc(bytes, 0, name.str().c_str());
    std::vector<int64_t> strides(sizes.size(), 1);
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d)
      strides[d] = strides[d + 1] * std::max<int64_t>(sizes[d + 1], 1);
    return wrap(data, sizes, strides, options);
  }

  static void writeback(const at::Tensor& dst, const at::Tensor& staged) {
    const_cast<at::Tensor&>(dst).copy_(staged);
  }

  static void check(int err, const char* op) {
    TORCH_CHECK(err == 0, op, ": emulated launch returned ", err);
  }
};

void configure(int64_t num_sms, int64_t l2_bytes, int64_t min_split_classes) {
  fl_simt::Config& c = fl_simt::config();
  c.num_sms = static_cast<int>(num_sms);
  c.l2_bytes = l2_bytes;
  c.min_split_classes = min_split_classes;
}

std::vector<int64_t> get_config() {
  const fl_simt::Config& c = fl_simt::config();
  return {c.num_sms, c.l2_bytes, c.min_split_classes, static_cast<int64_t>(c.seed)};
}

void set_seed(int64_t seed) { fl_simt::config().seed = static_cast<uint64_t>(seed); }

std::string launches() { return fl_simt::launch_log(); }
void reset_launches() { fl_simt::reset_launch_log(); }

// float32 -> the bits of the harness's __half (dtype 0) or __nv_bfloat16 (1), as int16.
at::Tensor float_to_bits(const at::Tensor& x, int64_t dtype) {
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(xf.sizes(), xf.options().dtype(at::kShort));
  const float* in = xf.data_ptr<float>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t i = 0; i < xf.numel(); ++i)
    o[i] = static_cast<int16_t>(dtype == 0 ? __float2half_rn(in[i]).__x : __float2bfloat16_rn(in[i]).__x);
  return out;
}

// int16 bits -> float32 through the harness's conversions.
at::Tensor bits_to_float(const at::Tensor& bits, int64_t dtype) {
  const at::Tensor b = bits.contiguous();
  at::Tensor out = at::empty(b.sizes(), b.options().dtype(at::kFloat));
  const int16_t* in = b.data_ptr<int16_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < b.numel(); ++i) {
    const auto u = static_cast<unsigned short>(in[i]);
    o[i] = dtype == 0 ? __half2float(__half{u}) : __bfloat162float(__nv_bfloat16{u});
  }
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

FUSEDLOSS_REGISTER_CUDA_OPS(FUSEDLOSS_LIBRARY, CPU, ::fusedloss::cuda::SimtPlatform)

TORCH_LIBRARY(fusedloss_simt_ctl, m) {
  m.def("configure(int num_sms, int l2_bytes, int min_split_classes) -> ()",
        &fusedloss::cuda::configure);
  m.def("get_config() -> int[]", &fusedloss::cuda::get_config);
  m.def("set_seed(int seed) -> ()", &fusedloss::cuda::set_seed);
  m.def("launches() -> str", &fusedloss::cuda::launches);
  m.def("reset_launches() -> ()", &fusedloss::cuda::reset_launches);
  m.def("float_to_bits(Tensor x, int dtype) -> Tensor", &fusedloss::cuda::float_to_bits);
  m.def("bits_to_float(Tensor bits, int dtype) -> Tensor", &fusedloss::cuda::bits_to_float);
}
