// ops_cuda.cpp — CUDA registration of the rnnlm_ext ops (their schema: ops.cpp), plus the
// cuda_path query. Thin glue: checks, .contiguous(), a device guard, the current stream and
// cuBLAS handle; the kernels are plain CUDA in rnn_cuda.cu. Compiled only in the CUDA build.
//
// Which implementation of the time loop runs (rnn_cuda.h) is the ops' cuda_path argument:
// "auto", "persistent" or "per_step" (rnnlm_ext/ops.py passes the caller's choice).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <string>

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
  Grads grads(d, checked_output_mask<5>(output_mask, kRnnGradNames), x.options());
  at::Tensor dz = at::empty({d.T, d.B, d.H}, x.options());  // workspace
  rnn_backward_cuda(grads.ptr(0), grads.ptr(1), grads.ptr(2), grads.ptr(3), grads.ptr(4),
                    dz.data_ptr(), a.dout.const_data_ptr(), a.x.const_data_ptr(),
                    a.h0.const_data_ptr(), a.w_ih.const_data_ptr(), a.w_hh.const_data_ptr(),
                    a.out.const_data_ptr(), d.T, d.B, d.I, d.H, dtype, a.act, reverse, path,
                    at::cuda::getCurrentCUDAStream(), at::cuda::getCurrentCUDABlasHandle());
  return grads.tuple();
}

// Which implementation the ops run on the current device for batch B, H hidden units and
// dtype when `path` is requested: 0 per-step, 1 persistent, -1 where the persistent path is
// requested but cannot run (the ops raise).
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
}

}  // namespace rnnlm_ext
