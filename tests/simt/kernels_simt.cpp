// The CUDA launchers and kernel templates of csrc/cuda, compiled as host C++ against the SIMT
// harness: the very same files, included whole.
#include "simt.h"

#include "../../csrc/cuda/distill_bf16.cu"
#include "../../csrc/cuda/distill_f16.cu"
#include "../../csrc/cuda/distill_f32.cu"
#include "../../csrc/cuda/distill_f64.cu"
#include "../../csrc/cuda/sigmoid_ce.cu"
#include "../../csrc/cuda/softmax_ce_bf16.cu"
#include "../../csrc/cuda/softmax_ce_f16.cu"
#include "../../csrc/cuda/softmax_ce_f32.cu"
#include "../../csrc/cuda/softmax_ce_f64.cu"
