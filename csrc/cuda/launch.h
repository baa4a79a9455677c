// The launchers of the CUDA kernels and their launch plans: plain C++ (no torch, no CUDA
// headers), shared by the op entries (csrc/cuda/ops_impl.h, which size the workspace from the
// plan) and the launchers (csrc/cuda/*.cu, which follow it).
//
// Softmax cross-entropy takes one of two paths:
//  - rows: a group of `tpr` threads holds a whole row in registers (`vecs` 16-byte packs per
//    thread): the logits are read from memory once, the gradient written once. tpr <= 32 puts
//    several rows in one block; tpr > 32 is one row per block, reduced through shared memory.
//  - split: a row too long for one block (more than 1024 threads x 8 packs), or too few rows
//    to fill the GPU, is cut into `splits` chunks, one block each. Stage 1 writes each chunk's
//    (max, sum exp, sums of the loss, z_target); stage 2 merges the row's partials in a fixed
//    order (deterministic, no atomics), then writes the loss and the chunk's gradient, reading
//    the chunk again. Long rows go in groups of rows whose logits fit in half the L2 cache, so
//    that the second read is served from L2 rather than HBM.
// Device-side scalars (the weight sum, the mean's two 1/denominators, 1/valid count of the
// accuracy) come from a small deterministic reduction kernel that runs first; the reduced loss
// and the extra outputs (its z-loss part, the token accuracy) from one that runs last. No step
// reads anything back to the host.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/distill.h"
#include "../common/dtype.h"
#include "../common/params.h"

namespace fusedloss {
namespace cuda {

// What the launchers need to know about the device (ops_cuda.cpp asks the driver once per
// device; the SIMT harness sets small values so that its tests reach every path).
struct DeviceInfo {
  int num_sms;
  int64_t l2_bytes;
  int64_t min_split_classes;  // rows shorter than this are never split for occupancy
};

constexpr int kRowsMaxThreads = 1024;  // threads of one row on the rows path
constexpr int kRowsMinBlock = 128;      // block size when a row needs fewer threads
constexpr int kSplitThreads = 256;      // threads of one chunk on the split path
constexpr int kSumThreads = 256;        // deterministic sums
constexpr int64_t kSumChunk = 16384;    // terms per block of a two-stage sum
constexpr int kSigmoidThreads = 256;
constexpr int kSigmoidVecs = 4;  // 16-byte packs per thread per chunk
constexpr int kScaleThreads = 256;
constexpr int kScaleVecs = 4;
// Split path: words of a chunk's partial (max, sum exp(z - max), sum w (z - max), sum w,
// z_target, the chunk's first index of its max).
constexpr int kPartialWords = 6;
// Workspace bytes of the device-side scalars of softmax_ce (4 acc_t).
constexpr int64_t kScalarBytes = 32;

inline int acc_size(ScalarType t) { return t == ScalarType::Float64 ? 8 : 4; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// The rows path keeps a thread's share of the row in registers, converted to acc_t: `vecs`
// 16-byte packs of logits (and of probability targets), i.e. this many 32-bit words.
inline constexpr int row_words(ScalarType t, bool prob, int vecs) {
  return vecs * (t == ScalarType::Float16 || t == ScalarType::BFloat16 ? 8 : 4) * (prob ? 2 : 1);
}

// The most threads per row (the kernel's launch bound) for which those words and the rest fit
// the registers of a thread with no spill: 1024 threads leave 64 registers a thread, 512 leave
// 128. 0: the configuration is not used. Measured, not guessed: tests/test_cuda_audit.py
// fails if any kernel spills.
inline constexpr int row_max_threads(ScalarType t, bool prob, int vecs) {
  const int words = row_words(t, prob, vecs);
  if (words <= 16) return 1024;
  if (words <= 32) return t == ScalarType::Float32 ? 1024 : 512;
  if (words <= 64 && !prob) return 512;
  return 0;
}

// Packs per thread on the split path: 32 values of a chunk per thread (16-bit packs hold 8).
inline constexpr int split_vecs(ScalarType t) {
  return t == ScalarType::Float16 || t == ScalarType::BFloat16 ? 4 : 8;
}

inline constexpr int max_row_vecs(ScalarType t, bool prob) {
  return row_max_threads(t, prob, 8) ? 8 : row_max_threads(t, prob, 4) ? 4 : 2;
}

// Scratch bytes of a deterministic sum over n terms (none when one block does it all).
inline int64_t sum_scratch_bytes(int64_t n) {
  const int64_t blocks = ceil_div(std::max<int64_t>(n, 1), kSumChunk);
  return blocks > 1 ? blocks * 3 * int64_t(sizeof(double)) : 0;  // a Sum3 per block
}

// Extra inputs of a softmax cross-entropy launch, beyond SoftmaxCEParams.
struct SoftmaxCEExtras {
  Reduction reduction;
  double mean_eps;
  void* loss_out;            // acc_t[1]: the reduced loss (Loss*/mean|sum), else null
  void* extras_out;          // acc_t[2]: with loss_out, the loss's z-loss part and the token
                             // accuracy (0 unless p.row_correct)
  const void* denominators;  // acc_t[2] or null: the mean's (weighted denominator, valid
                             // count), given by the caller instead of computed (no mean_eps)
  int64_t grad_loss_stride;  // GradFromLse: 1 = per-row grad_loss; 0 = one value for all rows
                             // (a mean/sum loss's grad_output, times the mean's scales)
  void* workspace;           // SoftmaxCEPlan::workspace_bytes, 16-byte aligned
};

// The class weights whose sum is the loss's W: every class's, except in a class slice's loss
// (a sharded Loss call, params.h), whose smoothing term is the slice's own.
struct WeightSumRange {
  int64_t offset, count;
};

inline WeightSumRange weight_sum_range(const SoftmaxCEParams& p) {
  const bool slice_loss = p.classes != p.global_classes && p.mode == SoftmaxCEMode::Loss;
  return slice_loss ? WeightSumRange{p.class_offset, p.classes}
                    : WeightSumRange{0, p.global_classes};
}

struct SoftmaxCEPlan {
  bool split = false;
  // rows path
  int vecs = 1, tpr = 1, block = kRowsMinBlock, rows_per_block = 1;
  // split path
  int64_t chunk = 0;
  int splits = 1;
  int64_t rows_per_group = 0;
  // device-side scalars and sums
  bool prep = false;        // weight sum / mean scales / valid count kernel
  int64_t prep_terms = 0;
  bool reduce_loss = false;  // final sums of the row losses (and their z-loss and accuracy)
  // workspace: [scalars: 4 acc_t][sum scratch][split partials]
  int64_t off_scratch = kScalarBytes, off_partials = kScalarBytes, workspace_bytes = kScalarBytes;
};

inline SoftmaxCEPlan plan_softmax_ce(const SoftmaxCEParams& p, const SoftmaxCEExtras& x,
                                     const DeviceInfo& d) {
  SoftmaxCEPlan plan;
  const int es = common::dtype_bytes(p.dtype);
  const int n = 16 / es;  // elements per 16-byte pack
  const bool prob = p.target == nullptr;
  const int64_t C = p.classes;
  // Every row has the same 16-byte phase when the row stride is a multiple of 16 bytes.
  const bool same_phase = (p.logits_row_stride * es) % 16 == 0 || p.rows <= 1;
  const int lead = same_phase ? static_cast<int>((reinterpret_cast<uintptr_t>(p.logits) & 15u) / es)
                              : n - 1;
  const int64_t slots = ceil_div(C + lead, n);
  // The fewest packs per thread that need at most 256 threads per row, else the configuration
  // with the most packs that holds the row at all.
  int64_t tpr = 0;
  for (int vecs = 1; vecs <= 8; vecs *= 2) {
    const int cap = row_max_threads(p.dtype, prob, vecs);
    const int64_t need = pow2_ceil(ceil_div(slots, vecs));
    if (cap == 0 || need > cap) continue;
    plan.vecs = vecs;
    tpr = need;
    if (need <= 256) break;
  }
  const bool long_rows = tpr == 0;
  if (!long_rows) {
    plan.tpr = static_cast<int>(tpr);
    plan.block = std::max(plan.tpr, kRowsMinBlock);
    plan.rows_per_block = plan.block / plan.tpr;
  }
  const int64_t row_blocks = ceil_div(p.rows, plan.rows_per_block);
  const bool few_rows = !long_rows && row_blocks < d.num_sms && C >= d.min_split_classes;
  if (long_rows || few_rows) {
    plan.split = true;
    // A chunk's slots (one more than chunk / n when the row is misaligned) fit the block.
    const int64_t unit = int64_t(kSplitThreads) * n;
    const int64_t max_chunk = int64_t(kSplitThreads * split_vecs(p.dtype) - 1) * n;
    int64_t chunk = max_chunk;
    if (few_rows) {
      const int64_t want_splits = ceil_div(2 * int64_t(d.num_sms), std::max<int64_t>(p.rows, 1));
      chunk = std::min(max_chunk, std::max(unit, round_up(ceil_div(C, want_splits), unit)));
    }
    plan.chunk = chunk;
    plan.splits = static_cast<int>(ceil_div(C, chunk));
    const int64_t row_bytes = C * es * (prob ? 2 : 1);
    int64_t group = long_rows ? std::max<int64_t>(1, (d.l2_bytes / 2) / std::max<int64_t>(row_bytes, 1))
                              : p.rows;
    group = std::min<int64_t>(std::max<int64_t>(group, 1), std::max<int64_t>(p.rows, 1));
    group = std::min<int64_t>(group, (int64_t(1) << 30) / plan.splits);
    plan.rows_per_group = group;
  }
  const bool from_stats = p.mode == SoftmaxCEMode::GradFromLse;
  const bool weighted_smoothing = p.class_weight != nullptr && p.label_smoothing != 0.0 && !prob;
  plan.reduce_loss = !from_stats && x.reduction != Reduction::None;
  // The accuracy of a reduced loss divides by the valid count, whatever the reduction.
  const bool accuracy = plan.reduce_loss && p.row_correct != nullptr;
  plan.prep = x.reduction == Reduction::Mean || weighted_smoothing || accuracy;
  plan.prep_terms = std::max<int64_t>(p.rows, p.class_weight ? weight_sum_range(p).count : 0);
  const int64_t scratch = std::max(plan.prep ? sum_scratch_bytes(plan.prep_terms) : 0,
                                   plan.reduce_loss ? sum_scratch_bytes(p.rows) : 0);
  plan.off_scratch = kScalarBytes;
  plan.off_partials = round_up(plan.off_scratch + scratch, 16);
  const int64_t partials =
      plan.split ? plan.rows_per_group * plan.splits * kPartialWords * acc_size(p.dtype) : 0;
  plan.workspace_bytes = round_up(plan.off_partials + partials, 16);
  return plan;
}

// Extra inputs of a sigmoid cross-entropy launch, beyond SigmoidCEParams.
struct SigmoidCEExtras {
  Reduction reduction;
  void* loss_out;      // acc_t[1]: the reduced loss (LossSum*), else null
  const void* factor;  // GradFromGradLoss of a reduced loss: acc_t[1] grad_output, else null
  void* workspace;     // SigmoidCEPlan::workspace_bytes
};

struct SigmoidCEPlan {
  bool flat = false;  // 128-bit path: input, target and the elementwise outputs contiguous
  int vec = 1;        // elements per access (16 bytes on the flat path, else 1)
  int64_t chunk = 0;  // elements per block
  int64_t blocks = 0;
  bool mask_scale = false;  // mean with a mask: 1 / sum(mask) on the device first
  int64_t mask_terms = 0;
  bool reduce_loss = false;
  int64_t off_scratch = 16, off_chunks = 16, workspace_bytes = 16;
};

inline bool aligned16(const void* ptr) {
  return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

// Terms of the sum of a broadcast operand over its (rows, cols) view (see sigmoid_ce.cuh).
inline int64_t broadcast_sum_terms(const BroadcastOperand& op, int64_t rows, int64_t cols) {
  if (op.col_stride == 0 || cols <= 1) return rows;
  if (op.row_stride == 0 || rows <= 1) return cols;
  return rows * cols;
}

inline SigmoidCEPlan plan_sigmoid_ce(const SigmoidCEParams& p, const SigmoidCEExtras& x) {
  SigmoidCEPlan plan;
  const int es = common::dtype_bytes(p.dtype);
  const int64_t numel = p.rows * p.cols;
  const bool contiguous_in = (p.rows <= 1 || p.input_row_stride == p.cols) &&
                             (p.rows <= 1 || p.target_row_stride == p.cols);
  const bool go_ok = p.mode != SigmoidCEMode::GradFromGradLoss || p.grad_loss == nullptr ||
                     p.rows <= 1 || p.grad_loss_row_stride == p.cols;
  plan.flat = contiguous_in && go_ok && aligned16(p.input) && aligned16(p.target) &&
              aligned16(p.grad_loss) && aligned16(p.loss) && aligned16(p.grad);
  plan.vec = plan.flat ? 16 / es : 1;
  plan.chunk = int64_t(kSigmoidThreads) * kSigmoidVecs * plan.vec;
  plan.blocks = ceil_div(numel, plan.chunk);
  const bool sums = p.mode == SigmoidCEMode::LossSum || p.mode == SigmoidCEMode::LossSumAndGrad;
  plan.mask_scale = x.reduction == Reduction::Mean && p.mask.data != nullptr;
  plan.mask_terms = plan.mask_scale ? broadcast_sum_terms(p.mask, p.rows, p.cols) : 0;
  plan.reduce_loss = sums;
  const int64_t scratch = std::max(plan.mask_scale ? sum_scratch_bytes(plan.mask_terms) : 0,
                                   plan.reduce_loss ? sum_scratch_bytes(plan.blocks) : 0);
  plan.off_scratch = 16;
  plan.off_chunks = round_up(plan.off_scratch + scratch, 16);
  plan.workspace_bytes =
      round_up(plan.off_chunks + (sums ? plan.blocks * acc_size(p.dtype) : 0), 16);
  return plan;
}

// Each returns 0 or the CUDA error of its first failed launch (the SIMT harness throws).
// Defined in softmax_ce.cuh and instantiated once per dtype, each in its own .cu file
// (softmax_ce_<dtype>.cu), so that they compile in parallel. The op entries choose the dtype's
// (ops_impl.h): a choice made here, in a header every .cu file includes, would instantiate every
// dtype's kernels in each of them.
template <ScalarType kDtype>
int launch_softmax_ce_of(const SoftmaxCEParams&, const SoftmaxCEExtras&, const DeviceInfo&, void*);
int launch_sigmoid_ce(const SigmoidCEParams&, const SigmoidCEExtras&, void* stream);
// grad[r, c] *= *scale over (rows, cols) with the given row stride (elements); the kernel
// reads the scale on the device and does nothing when it is exactly 1.
int launch_scale_grad(void* grad, ScalarType dtype, int64_t rows, int64_t cols,
                      int64_t row_stride, const void* scale, void* stream);

// Distillation (distill.cuh): one block of kDistillThreads threads per row, every row of the
// call in one launch (its rows are long: the block's loops cover them). Instantiated once per
// student dtype, each in its own .cu file (distill_<dtype>.cu), for every teacher dtype that
// may go with it; the op entries choose the student's (ops_impl.h), as softmax_ce's.
constexpr int kDistillThreads = 256;
template <ScalarType kStudent>
int launch_distill_of(const DistillParams&, void* stream);

}  // namespace cuda
}  // namespace fusedloss
