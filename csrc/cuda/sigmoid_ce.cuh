// Sigmoid cross-entropy kernels (elementwise over the (rows, cols) view of the input) and the
// in-place gradient scaling of the backward. The flat index is cut into fixed chunks, one block
// each; a chunk's loss is summed in a fixed order into its own slot, and the slots are added
// by the deterministic sum of reduce.cuh: no atomics, the same bits on every run.
#pragma once

#include "device.cuh"
#include "launch.h"
#include "reduce.cuh"

namespace fusedloss {
namespace cuda {

struct SigmoidCEArgs {
  SigmoidCEParams p;
  const void* scale;    // acc_t[1] (1 / sum of the mask, from the prep sum) or null
  double scale_value;   // used when scale is null: 1 / numel (mean) or 1
  const void* factor;   // acc_t[1]: a reduced loss's grad_output (backward), or null
  int64_t chunk;        // elements per block
  int64_t step_rows;    // (threads * vec) / cols
  int64_t step_cols;    // (threads * vec) % cols
};

template <typename acc_t>
FL_DEVICE acc_t operand_at(const BroadcastOperand& op, int64_t r, int64_t c) {
  return op.data != nullptr ? static_cast<const acc_t*>(op.data)[r * op.row_stride + c * op.col_stride]
                            : acc_t(1);
}

// The first n elements of v to dst: one 16-byte store when n is the whole pack.
template <typename T, int kVec>
FL_DEVICE void store_first(T* dst, int n, const Pack<T>& v) {
  if (kVec > 1 && n == kVec) {
    store_pack(dst, v);
    return;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) {  // unrolled: the pack stays in registers
    if (i < n) dst[i] = v.v[i];
  }
}

// Operands stored in the data's dtype T or, when `in_acc`, in acc_t (a float32 target or
// incoming gradient beside 16-bit data, read as it is): element i, or the kVec = 16 / sizeof(T)
// elements from f as 128-bit loads (f a multiple of kVec, the base 16-byte aligned).
template <typename T>
FL_DEVICE acc_of<T> load_either(const void* base, bool in_acc, int64_t i) {
  return in_acc ? static_cast<const acc_of<T>*>(base)[i] : to_acc(static_cast<const T*>(base)[i]);
}

template <typename T, int kVec>
FL_DEVICE void load_either_vec(const void* base, bool in_acc, int64_t f, acc_of<T> (&out)[kVec]) {
  static_assert(kVec == Pack<T>::N, "one 16-byte pack of T");
  if (in_acc) {
    load_acc_vec<acc_of<T>, kVec>(static_cast<const acc_of<T>*>(base) + f, out);
    return;
  }
  const Pack<T> v = load_pack(static_cast<const T*>(base) + f);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_acc(v.v[i]);
}

// kVec elements per access: 16 bytes on the flat path (input, target and the elementwise
// outputs contiguous and 16-byte aligned), 1 otherwise (any row strides).
template <typename T, SigmoidCEMode kMode, int kVec>
__global__ void __launch_bounds__(kSigmoidThreads) sigmoid_ce_kernel(const SigmoidCEArgs a) {
  using acc_t = acc_of<T>;
  constexpr bool kGrad =
      kMode == SigmoidCEMode::LossSumAndGrad || kMode == SigmoidCEMode::GradFromGradLoss;
  constexpr bool kSum = kMode == SigmoidCEMode::LossSum || kMode == SigmoidCEMode::LossSumAndGrad;
  const SigmoidCEParams& p = a.p;
  const int64_t cols = p.cols;
  const int64_t numel = p.rows * cols;
  const int64_t begin = int64_t(blockIdx.x) * a.chunk;
  const int64_t end = begin + a.chunk < numel ? begin + a.chunk : numel;
  const acc_t smoothing = acc_t(p.label_smoothing);
  const bool has_pw = p.pos_weight.data != nullptr;
  const bool track = kVec == 1 || p.weight.data != nullptr || has_pw || p.mask.data != nullptr;
  acc_t grad_factor = acc_t(1);
  if constexpr (kGrad) {
    grad_factor = a.scale != nullptr ? *static_cast<const acc_t*>(a.scale) : acc_t(a.scale_value);
    if (a.factor != nullptr) grad_factor *= *static_cast<const acc_t*>(a.factor);
  }
  const T* x = static_cast<const T*>(p.input);
  constexpr bool kGradIn = kMode == SigmoidCEMode::GradFromGradLoss;
  const bool go = kGradIn && p.grad_loss != nullptr;  // else every element's factor is 1
  acc_t* loss_out = static_cast<acc_t*>(p.loss);
  T* grad_out = static_cast<T*>(p.grad);

  // (r, c) of this thread's first element, then advanced without division.
  int64_t f = begin + int64_t(threadIdx.x) * kVec;
  int64_t r = 0, c = 0;
  if (track && f < end) {
    r = f / cols;
    c = f - r * cols;
  }
  acc_t sum = acc_t(0);
  for (; f < end; f += int64_t(kSigmoidThreads) * kVec) {
    const int n = end - f < kVec ? static_cast<int>(end - f) : kVec;
    Pack<T> xv;
    acc_t yv[kVec], gv[kVec];
    if constexpr (kVec > 1) {
      if (n == kVec) {
        xv = load_pack(x + f);
        load_either_vec<T, kVec>(p.target, p.target_in_acc, f, yv);
        if (go) load_either_vec<T, kVec>(p.grad_loss, p.grad_loss_in_acc, f, gv);
      }
    }
    acc_t lv[kVec];
    Pack<T> dv;
    int64_t rr = r, cc = c;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < n) {
        acc_t xe, ye, ge = acc_t(1);
        if (kVec > 1 && n == kVec) {
          xe = to_acc(xv.v[i]);
          ye = yv[i];
          if (go) ge = gv[i];
        } else if (kVec > 1) {  // the chunk's ragged end, flat layout
          xe = to_acc(x[f + i]);
          ye = load_either<T>(p.target, p.target_in_acc, f + i);
          if (go) ge = load_either<T>(p.grad_loss, p.grad_loss_in_acc, f + i);
        } else {  // any row strides
          xe = to_acc(x[rr * p.input_row_stride + cc]);
          ye = load_either<T>(p.target, p.target_in_acc, rr * p.target_row_stride + cc);
          if (go) ge = load_either<T>(p.grad_loss, p.grad_loss_in_acc, rr * p.grad_loss_row_stride + cc);
        }
        const acc_t yk = common::sigmoid_ce_smoothed_target(ye, smoothing);
        const acc_t pw = has_pw ? operand_at<acc_t>(p.pos_weight, rr, cc) : acc_t(1);
        const common::SigmoidCEValue<acc_t> v = common::sigmoid_ce_element(xe, yk, pw);
        const acc_t wm = operand_at<acc_t>(p.weight, rr, cc) * operand_at<acc_t>(p.mask, rr, cc);
        const acc_t loss = v.loss * wm;
        if constexpr (kSum) sum += loss;
        if constexpr (kMode == SigmoidCEMode::LossElements) lv[i] = loss;
        if constexpr (kGrad) dv.v[i] = from_acc<T>(v.dloss * wm * (ge * grad_factor));
      }
      if (track && ++cc == cols) {
        cc = 0;
        ++rr;
      }
    }
    // Outputs are contiguous (rows, cols): flat index f.
    if constexpr (kMode == SigmoidCEMode::LossElements) store_acc_first<acc_t, kVec>(loss_out + f, n, lv);
    if constexpr (kGrad) store_first<T, kVec>(grad_out + f, n, dv);
    if (track) {
      c += a.step_cols;
      r += a.step_rows;
      if (c >= cols) {
        c -= cols;
        ++r;
      }
    }
  }
  if constexpr (kSum) {
    FL_SHARED_ARRAY(acc_t, red, kSigmoidThreads / kWarp);
    sum = block_group_allreduce(sum, kSigmoidThreads, AddOp<acc_t>(), red);
    if (threadIdx.x == 0) static_cast<acc_t*>(p.chunk_loss)[blockIdx.x] = sum;
  }
}

// The sum of a broadcast operand over its (rows, cols) view, by the cheapest walk its strides
// allow (see broadcast_sum_terms).
template <typename acc_t>
struct BroadcastSumTerm {
  BroadcastOperand op;
  int64_t rows, cols;
  FL_DEVICE Sum3 operator()(int64_t i) const {
    const acc_t* d = static_cast<const acc_t*>(op.data);
    double v;
    if (op.col_stride == 0 || cols <= 1) v = static_cast<double>(d[i * op.row_stride]) * cols;
    else if (op.row_stride == 0 || rows <= 1) v = static_cast<double>(d[i * op.col_stride]) * rows;
    else {
      const int64_t r = i / cols;
      v = static_cast<double>(d[r * op.row_stride + (i - r * cols)]);
    }
    return {v, 0.0, 0.0};
  }
};

template <typename acc_t>
struct InverseFinish {
  acc_t* out;
  FL_DEVICE void operator()(int64_t, Sum3 s) const {
    out[0] = static_cast<acc_t>(s.a != 0.0 ? reciprocal(s.a) : 0.0);
  }
};

template <typename T, SigmoidCEMode kMode>
int launch_sigmoid_mode(const SigmoidCEArgs& a, const SigmoidCEPlan& plan, void* stream) {
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  if (plan.flat) {
    const auto sigmoid_ce_flat = &sigmoid_ce_kernel<T, kMode, Pack<T>::N>;
    FL_LAUNCH(sigmoid_ce_flat, grid, dim3(kSigmoidThreads), 0, stream, a);
  } else {
    const auto sigmoid_ce_strided = &sigmoid_ce_kernel<T, kMode, 1>;
    FL_LAUNCH(sigmoid_ce_strided, grid, dim3(kSigmoidThreads), 0, stream, a);
  }
  return FL_LAUNCH_STATUS();
}

template <typename T>
int launch_sigmoid_ce_t(const SigmoidCEParams& p0, const SigmoidCEExtras& x, void* stream) {
  using acc_t = acc_of<T>;
  const SigmoidCEPlan plan = plan_sigmoid_ce(p0, x);
  char* ws = static_cast<char*>(x.workspace);
  acc_t* scalars = reinterpret_cast<acc_t*>(ws);
  void* scratch = ws + plan.off_scratch;
  SigmoidCEArgs a{};
  a.p = p0;
  a.p.chunk_elems = plan.chunk;
  a.p.chunk_loss = plan.reduce_loss ? ws + plan.off_chunks : nullptr;
  const int64_t numel = p0.rows * p0.cols;
  a.scale_value = x.reduction == Reduction::Mean ? (numel != 0 ? 1.0 / static_cast<double>(numel) : 0.0)
                                                 : 1.0;
  a.factor = x.factor;
  a.chunk = plan.chunk;
  const int64_t step = int64_t(kSigmoidThreads) * plan.vec;
  a.step_rows = step / p0.cols;
  a.step_cols = step % p0.cols;
  if (plan.mask_scale) {
    const BroadcastSumTerm<acc_t> term{p0.mask, p0.rows, p0.cols};
    if (int err = launch_sum(term, plan.mask_terms, InverseFinish<acc_t>{scalars}, scratch, stream))
      return err;
    a.scale = scalars;
  }
  int err = -1;
  switch (p0.mode) {
    case SigmoidCEMode::LossSum: err = launch_sigmoid_mode<T, SigmoidCEMode::LossSum>(a, plan, stream); break;
    case SigmoidCEMode::LossSumAndGrad:
      err = launch_sigmoid_mode<T, SigmoidCEMode::LossSumAndGrad>(a, plan, stream);
      break;
    case SigmoidCEMode::LossElements:
      err = launch_sigmoid_mode<T, SigmoidCEMode::LossElements>(a, plan, stream);
      break;
    case SigmoidCEMode::GradFromGradLoss:
      err = launch_sigmoid_mode<T, SigmoidCEMode::GradFromGradLoss>(a, plan, stream);
      break;
  }
  if (err) return err;
  if (plan.reduce_loss) {
    const LossFinish<acc_t> finish{static_cast<acc_t*>(x.loss_out),
                                   static_cast<const acc_t*>(a.scale), a.scale_value};
    return launch_sum(ArrayTerm<acc_t>{static_cast<const acc_t*>(a.p.chunk_loss)}, plan.blocks,
                      finish, scratch, stream);
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// grad *= scale in place, over (rows, cols) with a row stride; block b takes slots
// [j * kScaleThreads * kScaleVecs, ...) of row b / blocks_per_row. When the scale is exactly 1
// (grad_output of 1, the usual case) every block returns at once: the pass costs one launch
// and no memory traffic, decided on the device.
struct ScaleGradArgs {
  void* data;
  int64_t cols, row_stride, blocks_per_row;
  const void* scale;
};

template <typename T>
__global__ void __launch_bounds__(kScaleThreads) scale_grad_kernel(const ScaleGradArgs a) {
  using acc_t = acc_of<T>;
  constexpr int N = Pack<T>::N;
  const acc_t s = *static_cast<const acc_t*>(a.scale);
  if (s == acc_t(1)) return;
  const int64_t row = blockIdx.x / a.blocks_per_row;
  const int64_t part = blockIdx.x - row * a.blocks_per_row;
  T* g = static_cast<T*>(a.data) + row * a.row_stride;
  const int lead = lead_of(g);
  const SlotRange sr = slot_range<T>(lead, 0, a.cols);
#pragma unroll
  for (int k = 0; k < kScaleVecs; ++k) {
    const int64_t slot = sr.first + (part * kScaleVecs + k) * kScaleThreads + threadIdx.x;
    if (slot >= sr.end) continue;
    Pack<T> v;
    const int64_t e0 = load_slot(static_cast<const T*>(g), lead, slot, 0, a.cols, v);
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = from_acc<T>(to_acc(v.v[i]) * s);
    store_slot(g, e0, 0, a.cols, true, v);
  }
}

template <typename T>
int launch_scale_grad_t(void* grad, int64_t rows, int64_t cols, int64_t row_stride,
                        const void* scale, void* stream) {
  constexpr int N = Pack<T>::N;
  ScaleGradArgs a{grad, cols, row_stride, 0, scale};
  const int64_t max_slots = ceil_div(cols + N - 1, N);
  a.blocks_per_row = ceil_div(max_slots, int64_t(kScaleThreads) * kScaleVecs);
  const auto scale_grad = &scale_grad_kernel<T>;
  FL_LAUNCH(scale_grad, dim3(static_cast<unsigned>(rows * a.blocks_per_row)), dim3(kScaleThreads), 0,
            stream, a);
  return FL_LAUNCH_STATUS();
}

}  // namespace cuda
}  // namespace fusedloss
