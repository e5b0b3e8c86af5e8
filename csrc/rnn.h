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
//   dz_t  = (dout_t + dz_{t+1}·w_hh) ⊙ act'(h_t)    relu: [h_t > 0]   tanh: 1 − h_t²
//   dh0   = dz_1·w_hh
//   dw_hh = Σ_t dz_tᵀ·h_{t-1}   dw_ih = dzᵀ·x   db = Σ dz   dx = dz·w_ih
// All gradients are written (=), never accumulated: the op returns fresh tensors and
// autograd does the accumulating.
#pragma once

#include <cstdint>

namespace rnnlm_ext {

enum class Activation { Tanh, Relu };

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

// Which BLAS the CPU GEMMs call: "blas (sgemm_/dgemm_ exported by libtorch ...)", saying
// whether float32 steps use MKL's packed GEMM, or "ATen addmm".
const char* cpu_gemm_backend();
// Which vector path the fused activation pass takes: "avx512", "avx2" or "scalar".
const char* cpu_activation_backend();

}  // namespace rnnlm_ext
