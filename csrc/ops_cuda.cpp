// ops_cuda.cpp — CUDA registration of the rnnlm_ext ops (their schema: ops.cpp), plus the
// cuda_path query. Thin glue: checks, .contiguous(), a device guard, the current stream and
// cuBLAS handle, the workspaces; the kernels are plain CUDA in rnn_cuda.cu (Elman) and
// cells_cuda.cu (LSTM, GRU). Compiled only in the CUDA build.
//
// Which implementation of the time loop runs (rnn_cuda.h) is the ops' cuda_path argument:
// "auto", "persistent" or "per_step" (rnnlm_ext/ops.py passes the caller's choice). The LSTM
// and GRU have the per-step loop only: "persistent" raises for them (cells_cuda.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <string>

#include "cells_cuda.h"
#include "rnn_args.h"
#include "rnn_cuda.h"

namespace rnnlm_ext {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(
          false, "rnnlm_ext: the CUDA kernel takes float32, float64, float16 or bfloat16, got ", t);
  }
}

CudaPath parse_path(c10::string_view name) {
  if (name == "auto") return CudaPath::Auto;
  if (name == "persistent") return CudaPath::Persistent;
  if (name == "per_step") return CudaPath::PerStep;
  TORCH_CHECK(false, "rnnlm_ext: cuda_path must be 'auto', 'persistent' or 'per_step', got '",
              std::string(name), "'");
}

// x [T,B,I], h0 [B,H], w_ih [H,I], w_hh [H,H], bias [H] or None  ->  out [T,B,H]
at::Tensor rnn_forward_cuda_op(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                               c10::string_view nonlinearity, bool reverse,
                               c10::string_view cuda_path) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ForwardArgs a(x, h0, w_ih, w_hh, bias, nonlinearity);
  const CudaPath path = parse_path(cuda_path);
  const DType dtype = to_dtype(x.scalar_type());
  at::Tensor out = at::empty({a.d.T, a.d.B, a.d.H}, x.options());
  rnn_forward_cuda(out.data_ptr(), a.x.const_data_ptr(), a.h0.const_data_ptr(),
                   a.w_ih.const_data_ptr(), a.w_hh.const_data_ptr(),
                   a.bias.defined() ? a.bias.const_data_ptr() : nullptr, a.d.T, a.d.B, a.d.I, a.d.H,
                   dtype, a.act, reverse, path, at::cuda::getCurrentCUDAStream(),
                   at::cuda::getCurrentCUDABlasHandle());
  return out;
}

// dout [T,B,H] and the forward's inputs and output -> (dx, dh0, dw_ih, dw_hh, db).
// output_mask says which to compute; the others come back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cuda_op(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& out, c10::string_view nonlinearity, bool reverse,
    const c10::List<bool>& output_mask, c10::string_view cuda_path) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BackwardArgs a(dout, x, h0, w_ih, w_hh, out, nonlinearity);
  const CudaPath path = parse_path(cuda_path);
  const DType dtype = to_dtype(x.scalar_type());
  const Dims& d = a.d;
  MaskedGrads<5> grads = rnn_grads(d, output_mask, x.options());
  at::Tensor dz = at::empty({d.T, d.B, d.H}, x.options());  // workspace
  rnn_backward_cuda(grads.ptr(0), grads.ptr(1), grads.ptr(2), grads.ptr(3), grads.ptr(4),
                    dz.data_ptr(), a.dout.const_data_ptr(), a.x.const_data_ptr(),
                    a.h0.const_data_ptr(), a.w_ih.const_data_ptr(), a.w_hh.const_data_ptr(),
                    a.out.const_data_ptr(), d.T, d.B, d.I, d.H, dtype, a.act, reverse, path,
                    at::cuda::getCurrentCUDAStream(), at::cuda::getCurrentCUDABlasHandle());
  return grads.tuple();
}

// LSTM: x [T,B,I], h0, c0 [B,H], w_ih [4H,I], w_hh [4H,H], bias [4H] (b_ih + b_hh) or None
//   -> out, c [T,B,H], gates [T,B,4H] (activated i, f, g, o) when train, else an empty [0] tensor
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_forward_cuda_op(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& bias, bool reverse, bool train,
    c10::string_view cuda_path) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LstmForwardArgs a(x, h0, c0, w_ih, w_hh, bias);
  const CudaPath path = parse_path(cuda_path);
  const DType dtype = to_dtype(x.scalar_type());
  const Dims& d = a.d;
  at::Tensor out = at::empty({d.T, d.B, d.H}, x.options());
  at::Tensor c = at::empty({d.T, d.B, d.H}, x.options());
  // the pre-activations go where the gates are kept (train), else into a workspace
  at::Tensor gates = at::empty({d.T, d.B, 4 * d.H}, x.options());
  lstm_forward_cuda(out.data_ptr(), c.data_ptr(), gates.data_ptr(), a.x.const_data_ptr(),
                    a.h0.const_data_ptr(), a.c0.const_data_ptr(), a.w_ih.const_data_ptr(),
                    a.w_hh.const_data_ptr(), a.bias.defined() ? a.bias.const_data_ptr() : nullptr,
                    d.T, d.B, d.I, d.H, dtype, reverse, train, path,
                    at::cuda::getCurrentCUDAStream(), at::cuda::getCurrentCUDABlasHandle());
  if (!train) gates = at::empty({0}, x.options());
  return {out, c, gates};
}

// dout, dc [T,B,H] (dc may be an empty [0] tensor: zero) and the forward's inputs and outputs
// -> (dx, dh0, dc0, dw_ih, dw_hh, dbias). output_mask says which to compute; the others come
// back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cuda_op(const at::Tensor& dout, const at::Tensor& dc, const at::Tensor& x,
                      const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const at::Tensor& out, const at::Tensor& c,
                      const at::Tensor& gates, bool reverse, const c10::List<bool>& output_mask,
                      c10::string_view cuda_path) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LstmBackwardArgs a(dout, dc, x, h0, c0, w_ih, w_hh, out, c, gates);
  const CudaPath path = parse_path(cuda_path);
  const DType dtype = to_dtype(x.scalar_type());
  const Dims& d = a.f.d;
  MaskedGrads<6> grads = lstm_grads(d, output_mask, x.options());
  at::Tensor workspace = at::empty({lstm_backward_workspace_size(d.T, d.B, d.H)}, x.options());
  lstm_backward_cuda(grads.ptr(0), grads.ptr(1), grads.ptr(2), grads.ptr(3), grads.ptr(4),
                     grads.ptr(5), workspace.data_ptr(), a.dout.const_data_ptr(),
                     a.dc.defined() ? a.dc.const_data_ptr() : nullptr, a.f.x.const_data_ptr(),
                     a.f.h0.const_data_ptr(), a.f.c0.const_data_ptr(), a.f.w_ih.const_data_ptr(),
                     a.f.w_hh.const_data_ptr(), a.out.const_data_ptr(), a.c.const_data_ptr(),
                     a.gates.const_data_ptr(), d.T, d.B, d.I, d.H, dtype, reverse, path,
                     at::cuda::getCurrentCUDAStream(), at::cuda::getCurrentCUDABlasHandle());
  return grads.tuple();
}

// GRU: x [T,B,I], h0 [B,H], w_ih [3H,I], w_hh [3H,H], b_ih, b_hh [3H] or None
//   -> out [T,B,H], saved [T,B,4H] (r, z, n, gh_n) when train, else an empty [0] tensor
std::tuple<at::Tensor, at::Tensor> gru_forward_cuda_op(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool reverse,
    bool train, c10::string_view cuda_path) {
  const c10::cuda::CUDAGuard guard(x.device());
  const GruForwardArgs a(x, h0, w_ih, w_hh, b_ih, b_hh);
  const CudaPath path = parse_path(cuda_path);
  const DType dtype = to_dtype(x.scalar_type());
  const Dims& d = a.d;
  at::Tensor out = at::empty({d.T, d.B, d.H}, x.options());
  at::Tensor saved =
      train ? at::empty({d.T, d.B, 4 * d.H}, x.options()) : at::empty({0}, x.options());
  at::Tensor workspace = at::empty({gru_forward_workspace_size(d.T, d.B, d.H, train)}, x.options());
  auto in = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; };
  gru_forward_cuda(out.data_ptr(), train ? saved.data_ptr() : nullptr, workspace.data_ptr(),
                   in(a.x), in(a.h0), in(a.w_ih), in(a.w_hh), in(a.b_ih), in(a.b_hh), d.T, d.B, d.I,
                   d.H, dtype, reverse, path, at::cuda::getCurrentCUDAStream(),
                   at::cuda::getCurrentCUDABlasHandle());
  return {out, saved};
}

// dout [T,B,H] and the forward's inputs and outputs -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh).
// output_mask says which to compute; the others come back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cuda_op(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h0,
                     const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& out,
                     const at::Tensor& saved, bool reverse, const c10::List<bool>& output_mask,
                     c10::string_view cuda_path) {
  const c10::cuda::CUDAGuard guard(x.device());
  const GruBackwardArgs a(dout, x, h0, w_ih, w_hh, out, saved);
  const CudaPath path = parse_path(cuda_path);
  const DType dtype = to_dtype(x.scalar_type());
  const Dims& d = a.d;
  MaskedGrads<6> grads = gru_grads(d, output_mask, x.options());
  at::Tensor workspace = at::empty({gru_backward_workspace_size(d.T, d.B, d.H)}, x.options());
  gru_backward_cuda(grads.ptr(0), grads.ptr(1), grads.ptr(2), grads.ptr(3), grads.ptr(4),
                    grads.ptr(5), workspace.data_ptr(), a.dout.const_data_ptr(),
                    a.x.const_data_ptr(), a.h0.const_data_ptr(), a.w_ih.const_data_ptr(),
                    a.w_hh.const_data_ptr(), a.out.const_data_ptr(), a.saved.const_data_ptr(), d.T,
                    d.B, d.I, d.H, dtype, reverse, path, at::cuda::getCurrentCUDAStream(),
                    at::cuda::getCurrentCUDABlasHandle());
  return grads.tuple();
}

// Which implementation the Elman ops run on the current device for batch B, H hidden units
// and dtype when `path` is requested (the LSTM and GRU ops always run per-step): 0 per-step, 1
// persistent, -1 where the persistent path is requested but cannot run (the ops raise).
int64_t cuda_path_op(int64_t B, int64_t H, at::ScalarType dtype, c10::string_view path) {
  TORCH_CHECK(B >= 1 && H >= 1, "rnnlm_ext: B and H must be >= 1, got B=", B, ", H=", H);
  const CudaPath request = parse_path(path);
  if (request == CudaPath::PerStep) return 0;
  const bool fits = rnn_persistent_fits(B, H, to_dtype(dtype));
  if (fits) return 1;
  return request == CudaPath::Persistent ? -1 : 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnnlm_ext, m) {
  m.def("cuda_path(int B, int H, ScalarType dtype, str path) -> int", &cuda_path_op);
}

TORCH_LIBRARY_IMPL(rnnlm_ext, CUDA, m) {
  m.impl("rnn_forward", &rnn_forward_cuda_op);
  m.impl("rnn_backward", &rnn_backward_cuda_op);
  m.impl("lstm_forward", &lstm_forward_cuda_op);
  m.impl("lstm_backward", &lstm_backward_cuda_op);
  m.impl("gru_forward", &gru_forward_cuda_op);
  m.impl("gru_backward", &gru_backward_cuda_op);
}

}  // namespace rnnlm_ext
