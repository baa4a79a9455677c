// CPU sigmoid cross-entropy and the in-place gradient scaling. Included only by
// isa_kernels.cpp, which is compiled once per instruction set.
//
// The (rows, cols) view of the input is cut into fixed chunks of the flat index, whatever the
// thread count: each chunk's loss is summed in a fixed order into its own slot, and the op
// entry adds the slots in order, so the reduction is bitwise reproducible.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../common/losses.h"
#include "../common/params.h"
#include "vec_math.h"

namespace fusedloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

using namespace ::fusedloss::common;

// kWeighted: a weight or a mask is given (without, the products by 1 are left out).
template <typename scalar_t, bool kPosWeight, bool kWeighted, SigmoidCEMode kMode>
struct SigmoidCEChunkKernel {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  static constexpr int K = IO::K;
  static constexpr int64_t kStep = IO::kStep;
  using Exp = std::conditional_t<IO::kReduced, FastExp, AccurateExp>;  // as in softmax_ce

  const SigmoidCEParams& p;
  acc_t grad_scale;
  acc_t grad_divisor;      // 0: none
  acc_t inv_grad_divisor;  // 0: none; else 1 / divisor, exactly (a power of two)

  explicit SigmoidCEChunkKernel(const SigmoidCEParams& params) : p(params) {
    grad_scale = p.grad_scale ? *static_cast<const acc_t*>(p.grad_scale) : acc_t(1);
    // 16-bit data: the rounded inverse's error is far below their rounding, and a division
    // per step costs (measured 1.1x); float32/float64 divide as PyTorch does, except by a
    // power of two, whose inverse is exact: then x * (1/d) and x / d are the same correctly
    // rounded number, for a multiply instead of a division per step.
    grad_divisor = IO::kReduced ? acc_t(0) : acc_t(p.grad_divisor);
    if (IO::kReduced && p.grad_divisor != 0) grad_scale = grad_scale / acc_t(p.grad_divisor);
    inv_grad_divisor = acc_t(0);
    int exponent = 0;
    if (grad_divisor > acc_t(0) && std::frexp(grad_divisor, &exponent) == acc_t(0.5) &&
        exponent < std::numeric_limits<acc_t>::max_exponent) {  // 1 / 2^(exponent-1) is normal
      inv_grad_divisor = acc_t(1) / grad_divisor;
      grad_divisor = acc_t(0);
    }
  }

  // Operand values of one step at (r, c): absent -> 1, broadcast column -> splat, else load.
  static void load_operand(const BroadcastOperand& op, int64_t r, int64_t c, int64_t n, Vec* v) {
    if (op.data == nullptr) {
      for (int k = 0; k < K; ++k) v[k] = Vec(acc_t(1));
      return;
    }
    const acc_t* base = static_cast<const acc_t*>(op.data) + r * op.row_stride;
    if (op.col_stride == 0) {
      for (int k = 0; k < K; ++k) v[k] = Vec(base[0]);
    } else if (n == kStep) {
      IO::load_acc(base + c, v);
    } else {
      IO::load_acc_partial(base + c, n, v);
    }
  }

  // Processes flat elements [begin, end) and returns the sum of their losses.
  acc_t run(int64_t begin, int64_t end) const {
    const int64_t cols = p.cols;
    const auto* input = static_cast<const scalar_t*>(p.input);
    const auto* grad_loss = static_cast<const scalar_t*>(p.grad_loss);
    auto* loss_out = static_cast<acc_t*>(p.loss);
    auto* grad_out = static_cast<scalar_t*>(p.grad);
    const acc_t smoothing = acc_t(p.label_smoothing);
    constexpr bool kGrad =
        kMode == SigmoidCEMode::LossSumAndGrad || kMode == SigmoidCEMode::GradFromGradLoss;
    constexpr bool kSum = kMode == SigmoidCEMode::LossSum || kMode == SigmoidCEMode::LossSumAndGrad;

    BlockedSum<Vec, K> vsum;
    int64_t r = begin / cols;
    int64_t c = begin - r * cols;
    for (int64_t pos = begin; pos < end;) {
      const int64_t seg = std::min(end - pos, cols - c);
      const scalar_t* x = input + r * p.input_row_stride;
      const void* y = IO::row_of(p.target, p.target_in_acc, r, p.target_row_stride);
      for (int64_t j = c; j < c + seg; j += kStep) {
        const int64_t n = std::min<int64_t>(kStep, c + seg - j);
        Vec xv[K], yv[K], w[K], pw[K], m[K];
        if (n == kStep) IO::load(x + j, xv);
        else IO::load_partial(x + j, n, xv);
        IO::load_either(y, p.target_in_acc, j, n, yv);
        if constexpr (kWeighted) {
          load_operand(p.weight, r, j, n, w);
          load_operand(p.mask, r, j, n, m);
        }
        if constexpr (kPosWeight) load_operand(p.pos_weight, r, j, n, pw);
        Vec loss[K], dloss[K];
        for (int k = 0; k < K; ++k) {
          const Vec yk = sigmoid_ce_smoothed_target(yv[k], smoothing);
          const auto v = sigmoid_ce_element<Vec, Exp, kPosWeight>(
              xv[k], yk, kPosWeight ? pw[k] : Vec(acc_t(1)), Exp{});
          if constexpr (kWeighted) {
            const Vec wm = w[k] * m[k];
            loss[k] = v.loss * wm;
            dloss[k] = v.dloss * wm;
          } else {
            loss[k] = v.loss;
            dloss[k] = v.dloss;
          }
        }
        if constexpr (kSum) {
          Vec counted[K];
          for (int k = 0; k < K; ++k)
            counted[k] = n == kStep ? loss[k] : (loss[k] & IO::lanes_below(n, k));
          vsum.add(counted);
        }
        const int64_t flat = r * cols + j;
        if constexpr (kMode == SigmoidCEMode::LossElements) {
          if (n == kStep) IO::store_acc(loss_out + flat, loss);
          else IO::store_acc_partial(loss_out + flat, n, loss);
        }
        if constexpr (kGrad) {
          Vec scale[K];
          if (kMode == SigmoidCEMode::GradFromGradLoss && grad_loss != nullptr) {
            const scalar_t* go = grad_loss + r * p.grad_loss_row_stride + j;
            if (n == kStep) IO::load(go, scale);
            else IO::load_partial(go, n, scale);
          } else {
            for (int k = 0; k < K; ++k) scale[k] = Vec(grad_scale);
          }
          for (int k = 0; k < K; ++k) dloss[k] = dloss[k] * scale[k];
          if (grad_divisor != acc_t(0)) {
            for (int k = 0; k < K; ++k) dloss[k] = dloss[k] / Vec(grad_divisor);
          } else if (inv_grad_divisor != acc_t(0)) {
            for (int k = 0; k < K; ++k) dloss[k] = dloss[k] * Vec(inv_grad_divisor);
          }
          if (n == kStep) IO::store(grad_out + flat, dloss);
          else IO::store_partial(grad_out + flat, n, dloss);
        }
      }
      pos += seg;
      ++r;
      c = 0;
    }
    return vsum.result();
  }
};

template <typename scalar_t, bool kPosWeight, bool kWeighted, SigmoidCEMode kMode>
void sigmoid_ce_launch(const SigmoidCEParams& p) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const int64_t numel = p.rows * p.cols;
  const int64_t chunks = (numel + p.chunk_elems - 1) / p.chunk_elems;
  auto* chunk_loss = static_cast<acc_t*>(p.chunk_loss);
  const SigmoidCEChunkKernel<scalar_t, kPosWeight, kWeighted, kMode> kernel(p);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t s = kernel.run(i * p.chunk_elems, std::min(numel, (i + 1) * p.chunk_elems));
      if (chunk_loss) chunk_loss[i] = s;
    }
  });
}

template <typename scalar_t, bool kPosWeight, bool kWeighted>
void sigmoid_ce_dispatch_mode(const SigmoidCEParams& p) {
  switch (p.mode) {
    case SigmoidCEMode::LossSum:
      return sigmoid_ce_launch<scalar_t, kPosWeight, kWeighted, SigmoidCEMode::LossSum>(p);
    case SigmoidCEMode::LossSumAndGrad:
      return sigmoid_ce_launch<scalar_t, kPosWeight, kWeighted, SigmoidCEMode::LossSumAndGrad>(p);
    case SigmoidCEMode::LossElements:
      return sigmoid_ce_launch<scalar_t, kPosWeight, kWeighted, SigmoidCEMode::LossElements>(p);
    case SigmoidCEMode::GradFromGradLoss:
      return sigmoid_ce_launch<scalar_t, kPosWeight, kWeighted, SigmoidCEMode::GradFromGradLoss>(p);
  }
}

template <typename scalar_t>
void sigmoid_ce_dispatch_flags(const SigmoidCEParams& p) {
  const bool pw = p.pos_weight.data != nullptr;
  const bool weighted = p.weight.data != nullptr || p.mask.data != nullptr;
  if (pw && weighted) return sigmoid_ce_dispatch_mode<scalar_t, true, true>(p);
  if (pw) return sigmoid_ce_dispatch_mode<scalar_t, true, false>(p);
  if (weighted) return sigmoid_ce_dispatch_mode<scalar_t, false, true>(p);
  return sigmoid_ce_dispatch_mode<scalar_t, false, false>(p);
}

// grad *= scale, in place, over a contiguous buffer. The caller has already skipped scale 1.
template <typename scalar_t>
void scale_inplace(void* data, int64_t numel, double scale) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  auto* d = static_cast<scalar_t*>(data);
  const Vec s(static_cast<acc_t>(scale));
  at::parallel_for(0, numel, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j += IO::kStep) {
      const int64_t n = std::min<int64_t>(IO::kStep, end - j);
      Vec v[IO::K];
      if (n == IO::kStep) IO::load(d + j, v);
      else IO::load_partial(d + j, n, v);
      for (int k = 0; k < IO::K; ++k) v[k] = v[k] * s;
      if (n == IO::kStep) IO::store(d + j, v);
      else IO::store_partial(d + j, n, v);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss
