// Merging the partial sums of a row that was split into parts (CUDA split-row path): each part
// keeps its sums relative to its own max m_part (sum_c w_c (z_c - m_part), exact for logits of
// any size, see losses.h); moving such a sum to the row max m is one multiply-add.
#pragma once

#include "math.h"

namespace fusedloss {
namespace common {
FL_ISA_NAMESPACE_BEGIN

// sum_c w_c (z_c - m) from sum_c w_c (z_c - m_part) and sum_c w_c over the same part. A part
// whose logits are all -inf (m_part = -inf) has sum w (z - m) = -inf where it has weight.
template <typename T>
FL_HD T softmax_sum_rebase(T sum_w_zm_part, T sum_w_part, T m_part, T m) {
  if (m_part == fl_neg_infinity<T>()) return sum_w_part != T(0) ? fl_neg_infinity<T>() : T(0);
  return sum_w_zm_part + (m_part - m) * sum_w_part;
}

FL_ISA_NAMESPACE_END
}  // namespace common
}  // namespace fusedloss
