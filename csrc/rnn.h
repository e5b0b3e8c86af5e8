// rnn.h — the fused Elman RNN layer: dimension names, tensor layouts and the kernel
// declarations shared by the CPU (rnn_cpu.cpp) and CUDA (rnn_cuda.cu) implementations.
// Plain C++: no torch types here, so that the CUDA kernels compile with nvcc alone.
//
// Dimensions, used everywhere in csrc/:
//   T  time steps          B  batch size
//   I  input features      H  hidden units
//
// Layouts (all row-major, contiguous):
//   x     [T,B,I]   input sequence
//   h0    [B,H]     initial hidden state
//   w_ih  [H,I]     input-to-hidden weight      w_hh [H,H]  hidden-to-hidden weight
//   b     [H]       b_ih + b_hh, or nullptr when the layer has no bias
//   out   [T,B,H]   every hidden state h_1 … h_T (h_n is out[T-1], or out[0] when reversed)
//
// Forward (one layer, one direction):
//   P      = x·w_ihᵀ                   one GEMM over all T·B rows, written into out
//   h_t    = act(P_t + h_{t-1}·w_hhᵀ + b)   one GEMM per step, bias + act fused in one pass
// `reverse` runs the steps from t = T-1 down to 0 (the backward direction of a
// bidirectional layer) without flipping any tensor: out[t] is still the state at input x[t].
//
// Backward, given dout [T,B,H] (dh_n already folded into the last step of dout):
//   dz_t  = (dout_t + dz_{t+1}·w_hh) ⊙ act'(h_t)    relu: 0 if h_t <= 0 else 1   tanh: 1 − h_t²
//   dh0   = dz_1·w_hh
//   dw_hh = Σ_t dz_tᵀ·h_{t-1}   dw_ih = dzᵀ·x   db = Σ dz   dx = dz·w_ih
// All gradients are written (=), never accumulated: the op returns fresh tensors and
// autograd does the accumulating.
#pragma once

#include <cstdint>

namespace rnnlm_ext {

enum class Activation { Tanh, Relu };

// ----------------------------------------------------------------------------------------
// Step order, shared by every kernel (CPU and CUDA, host and device code).
//
// Loop step s = 0 … T-1 counts the steps in the order the forward runs them; t is the time
// index of the tensors (x[t], out[t]). Forward: t = s. Reversed: t = T-1-s, so step 0 reads
// x[T-1], and h_{t-1} (the state the step reads) is out[t+1]. No tensor is flipped.

#ifdef __CUDACC__
#define RNNLM_EXT_HOST_DEVICE __host__ __device__
#else
#define RNNLM_EXT_HOST_DEVICE
#endif

struct StepOrder {
  int64_t T;
  bool reverse;

  // time index of loop step s
  RNNLM_EXT_HOST_DEVICE int64_t time(int64_t s) const { return reverse ? T - 1 - s : s; }
  // time index of the output that loop step s >= 1 reads as its h_{t-1}: that of step s-1
  RNNLM_EXT_HOST_DEVICE int64_t prev_time(int64_t s) const { return time(s - 1); }
  // time index of the step that read h0
  RNNLM_EXT_HOST_DEVICE int64_t first_time() const { return time(0); }
  // loop steps [s0,s1) cover the time indices [begin, begin + s1 - s0), in one order or the other
  RNNLM_EXT_HOST_DEVICE int64_t range_begin(int64_t s0, int64_t s1) const {
    return reverse ? T - s1 : s0;
  }
};

// dW_hh = Σ_t dz_tᵀ·h_{t-1} over the time indices [begin,end) in two GEMMs and no copy: the
// step that read h0 (when in the range), then the run of times [lo,hi) whose h_{t-1} are rows
// of out shifted by one step, contiguous from out[prev_of_lo] on.
struct PrevStates {
  bool has_first;  // the step that read h0 is in the range, at time `first`
  int64_t first;
  int64_t lo, hi;      // the other times, h_{t-1} from out; empty when hi <= lo
  int64_t prev_of_lo;  // the time index of the out row that time lo read as its h_{t-1}
};

inline PrevStates split_prev_states(const StepOrder& order, int64_t begin, int64_t end) {
  PrevStates p;
  p.first = order.first_time();
  p.has_first = begin <= p.first && p.first < end;
  p.lo = p.has_first && !order.reverse ? begin + 1 : begin;
  p.hi = p.has_first && order.reverse ? end - 1 : end;
  p.prev_of_lo = order.reverse ? p.lo + 1 : p.lo - 1;
  return p;
}

// ----------------------------------------------------------------------------------------
// CPU (rnn_cpu.cpp). scalar_t is float or double.

// out: [T,B,H] written. Keeps nothing but `out`: act' is a function of the output alone.
template <typename scalar_t>
void rnn_forward_cpu(scalar_t* out, const scalar_t* x, const scalar_t* h0, const scalar_t* w_ih,
                     const scalar_t* w_hh, const scalar_t* b, int64_t T, int64_t B, int64_t I,
                     int64_t H, Activation act, bool reverse);

// Each gradient pointer may be nullptr: that gradient is then not computed.
// dz: [T,B,H] workspace, overwritten.
template <typename scalar_t>
void rnn_backward_cpu(scalar_t* dx, scalar_t* dh0, scalar_t* dw_ih, scalar_t* dw_hh, scalar_t* db,
                      scalar_t* dz, const scalar_t* dout, const scalar_t* x, const scalar_t* h0,
                      const scalar_t* w_ih, const scalar_t* w_hh, const scalar_t* out, int64_t T,
                      int64_t B, int64_t I, int64_t H, Activation act, bool reverse);

}  // namespace rnnlm_ext
