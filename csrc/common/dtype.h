// The dtypes the kernels take (params.h's ScalarType), turned into compile-time values in one
// place: every switch over the dtypes (the CPU kernel table, the CUDA launchers, the op
// entries' mapping from torch's dtypes) is visit_dtype.
#pragma once

#include <type_traits>

#include "macros.h"
#include "params.h"

namespace fusedloss {
namespace common {
FL_ISA_NAMESPACE_BEGIN

// A dtype as a compile-time value: what visit_dtype hands its function.
template <ScalarType kDtype>
struct Dtype {
  static constexpr ScalarType value = kDtype;
  static constexpr int bytes =
      kDtype == ScalarType::Float64 ? 8 : kDtype == ScalarType::Float32 ? 4 : 2;
};

inline constexpr ScalarType kDtypes[] = {ScalarType::Float16, ScalarType::BFloat16,
                                         ScalarType::Float32, ScalarType::Float64};

// The storage type of a dtype on a backend, given that backend's 16-bit types (c10::Half and
// c10::BFloat16 beside torch, __half and __nv_bfloat16 in the CUDA kernels).
template <ScalarType kDtype, typename Half, typename BFloat16>
using storage_of = std::conditional_t<
    kDtype == ScalarType::Float16, Half,
    std::conditional_t<kDtype == ScalarType::BFloat16, BFloat16,
                       std::conditional_t<kDtype == ScalarType::Float32, float, double>>>;

// fn(Dtype<dtype>{}), whose result it returns; `unknown` for a value that is no ScalarType
// (fn is not called then).
template <typename R, typename Fn>
constexpr R visit_dtype(ScalarType dtype, R unknown, Fn&& fn) {
  switch (dtype) {
    case ScalarType::Float16: return fn(Dtype<ScalarType::Float16>{});
    case ScalarType::BFloat16: return fn(Dtype<ScalarType::BFloat16>{});
    case ScalarType::Float32: return fn(Dtype<ScalarType::Float32>{});
    case ScalarType::Float64: return fn(Dtype<ScalarType::Float64>{});
  }
  return unknown;
}

constexpr int dtype_bytes(ScalarType dtype) {
  return visit_dtype(dtype, 4, [](auto d) { return decltype(d)::bytes; });
}

FL_ISA_NAMESPACE_END
}  // namespace common
}  // namespace fusedloss
