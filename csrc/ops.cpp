// ops.cpp — the rnnlm_ext operator schema, its CPU kernels' registration, and the _C module.
//
// The schema is declared here once. CUDA kernels register against the same names from the
// CUDA glue (built only when the extension is a CUDAExtension). Python sees the ops as
// torch.ops.rnnlm_ext.*; rnnlm_ext/ops.py adds autograd and the fake (meta) kernels.
#include <torch/extension.h>
#include <torch/library.h>

#include <array>

#include "cpu_gemm.h"
#include "cpu_simd.h"
#include "cpu_workspace.h"
#include "gru.h"
#include "lstm.h"
#include "rnn.h"
#include "rnn_args.h"

namespace rnnlm_ext {
namespace {

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "rnnlm_ext: the CPU kernel takes float32 or float64, got ", x.scalar_type());
}

// x [T,B,I], h0 [B,H], w_ih [H,I], w_hh [H,H], bias [H] or None  ->  out [T,B,H]
// cuda_path picks the CUDA kernels' time loop; the CPU has one.
at::Tensor rnn_forward_cpu_op(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                              c10::string_view nonlinearity, bool reverse,
                              c10::string_view /*cuda_path*/) {
  const ForwardArgs a(x, h0, w_ih, w_hh, bias, nonlinearity);
  check_cpu_dtype(x);
  at::Tensor out = at::empty({a.d.T, a.d.B, a.d.H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_forward_cpu", [&] {
    rnn_forward_cpu<scalar_t>(out.data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
                              a.h0.const_data_ptr<scalar_t>(), a.w_ih.const_data_ptr<scalar_t>(),
                              a.w_hh.const_data_ptr<scalar_t>(),
                              a.bias.defined() ? a.bias.const_data_ptr<scalar_t>() : nullptr, a.d.T,
                              a.d.B, a.d.I, a.d.H, a.act, reverse);
  });
  return out;
}

// dout [T,B,H] and the forward's inputs and output -> (dx, dh0, dw_ih, dw_hh, db).
// output_mask says which to compute; the others come back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cpu_op(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& out, c10::string_view nonlinearity, bool reverse,
    const c10::List<bool>& output_mask, c10::string_view /*cuda_path*/) {
  const BackwardArgs a(dout, x, h0, w_ih, w_hh, out, nonlinearity);
  check_cpu_dtype(x);
  const Dims& d = a.d;
  MaskedGrads<5> grads = rnn_grads(d, output_mask, x.options());
  const cpu::Workspace workspace(d.T * d.B * d.H, x.options());
  const at::Tensor dz = workspace.view({d.T, d.B, d.H});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_backward_cpu", [&] {
    auto ptr = [&](size_t i) { return static_cast<scalar_t*>(grads.ptr(i)); };
    rnn_backward_cpu<scalar_t>(ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), dz.data_ptr<scalar_t>(),
                               a.dout.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
                               a.h0.const_data_ptr<scalar_t>(), a.w_ih.const_data_ptr<scalar_t>(),
                               a.w_hh.const_data_ptr<scalar_t>(), a.out.const_data_ptr<scalar_t>(),
                               d.T, d.B, d.I, d.H, a.act, reverse);
  });
  return grads.tuple();
}

// GRU: x [T,B,I], h0 [B,H], w_ih [3H,I], w_hh [3H,H], b_ih, b_hh [3H] or None
//   -> out [T,B,H], saved [T,B,4H] (r, z, n, gh_n) when train, else an empty [0] tensor
std::tuple<at::Tensor, at::Tensor> gru_forward_cpu_op(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool reverse,
    bool train, c10::string_view /*cuda_path*/) {
  const GruForwardArgs a(x, h0, w_ih, w_hh, b_ih, b_hh);
  check_cpu_dtype(x);
  const Dims& d = a.d;
  at::Tensor out = at::empty({d.T, d.B, d.H}, x.options());
  at::Tensor saved =
      train ? at::empty({d.T, d.B, 4 * d.H}, x.options()) : at::empty({0}, x.options());
  const cpu::Workspace workspace(gru_forward_workspace_size(d.T, d.B, d.H, train), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_forward_cpu", [&] {
    auto in = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    };
    gru_forward_cpu<scalar_t>(
        out.data_ptr<scalar_t>(), train ? saved.data_ptr<scalar_t>() : nullptr,
        workspace.view({-1}).data_ptr<scalar_t>(), in(a.x), in(a.h0), in(a.w_ih), in(a.w_hh),
        in(a.b_ih), in(a.b_hh), d.T, d.B, d.I, d.H, reverse);
  });
  return {out, saved};
}

// dout [T,B,H] and the forward's inputs and outputs -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh).
// output_mask says which to compute; the others come back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cpu_op(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h0,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& out,
                    const at::Tensor& saved, bool reverse, const c10::List<bool>& output_mask,
                    c10::string_view /*cuda_path*/) {
  const GruBackwardArgs a(dout, x, h0, w_ih, w_hh, out, saved);
  check_cpu_dtype(x);
  const Dims& d = a.d;
  MaskedGrads<6> grads = gru_grads(d, output_mask, x.options());
  const cpu::Workspace workspace(gru_backward_workspace_size(d.T, d.B, d.H), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_backward_cpu", [&] {
    auto ptr = [&](size_t i) { return static_cast<scalar_t*>(grads.ptr(i)); };
    gru_backward_cpu<scalar_t>(ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), ptr(5),
                               workspace.view({-1}).data_ptr<scalar_t>(),
                               a.dout.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
                               a.h0.const_data_ptr<scalar_t>(), a.w_ih.const_data_ptr<scalar_t>(),
                               a.w_hh.const_data_ptr<scalar_t>(), a.out.const_data_ptr<scalar_t>(),
                               a.saved.const_data_ptr<scalar_t>(), d.T, d.B, d.I, d.H, reverse);
  });
  return grads.tuple();
}

// LSTM: x [T,B,I], h0, c0 [B,H], w_ih [4H,I], w_hh [4H,H], bias [4H] (b_ih + b_hh) or None
//   -> out, c [T,B,H], gates [T,B,4H] (activated i, f, g, o) when train, else an empty [0] tensor
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu_op(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& bias, bool reverse, bool train,
    c10::string_view /*cuda_path*/) {
  const LstmForwardArgs a(x, h0, c0, w_ih, w_hh, bias);
  check_cpu_dtype(x);
  const Dims& d = a.d;
  at::Tensor out = at::empty({d.T, d.B, d.H}, x.options());
  at::Tensor c = at::empty({d.T, d.B, d.H}, x.options());
  at::Tensor gates =
      train ? at::empty({d.T, d.B, 4 * d.H}, x.options()) : at::empty({0}, x.options());
  const cpu::Workspace workspace(lstm_forward_workspace_size(d.T, d.B, d.H, train), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_forward_cpu", [&] {
    auto in = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    };
    lstm_forward_cpu<scalar_t>(out.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                               train ? gates.data_ptr<scalar_t>() : nullptr,
                               workspace.view({-1}).data_ptr<scalar_t>(), in(a.x), in(a.h0),
                               in(a.c0), in(a.w_ih), in(a.w_hh), in(a.bias), d.T, d.B, d.I, d.H,
                               reverse);
  });
  return {out, c, gates};
}

// dout, dc [T,B,H] (dc may be an empty [0] tensor: zero) and the forward's inputs and outputs
// -> (dx, dh0, dc0, dw_ih, dw_hh, dbias). output_mask says which to compute; the others come
// back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cpu_op(const at::Tensor& dout, const at::Tensor& dc, const at::Tensor& x,
                     const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const at::Tensor& out, const at::Tensor& c,
                     const at::Tensor& gates, bool reverse, const c10::List<bool>& output_mask,
                     c10::string_view /*cuda_path*/) {
  const LstmBackwardArgs a(dout, dc, x, h0, c0, w_ih, w_hh, out, c, gates);
  check_cpu_dtype(x);
  const Dims& d = a.f.d;
  MaskedGrads<6> grads = lstm_grads(d, output_mask, x.options());
  const cpu::Workspace workspace(lstm_backward_workspace_size(d.T, d.B, d.H), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_backward_cpu", [&] {
    auto ptr = [&](size_t i) { return static_cast<scalar_t*>(grads.ptr(i)); };
    auto in = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    };
    lstm_backward_cpu<scalar_t>(ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), ptr(5),
                                workspace.view({-1}).data_ptr<scalar_t>(), in(a.dout), in(a.dc),
                                in(a.f.x), in(a.f.h0), in(a.f.c0), in(a.f.w_ih), in(a.f.w_hh),
                                in(a.out), in(a.c), in(a.gates), d.T, d.B, d.I, d.H, reverse);
  });
  return grads.tuple();
}

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["flags"] = RNNLM_EXT_BUILD_FLAGS;
  info["torch_version"] = TORCH_VERSION;
  info["cpu_gemm"] = cpu::blas_name();
  info["cpu_activation"] = cpu::isa_name();
  info["cpu_capability"] = at::get_cpu_capability();
  info["num_threads"] = at::get_num_threads();
#ifdef RNNLM_EXT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(rnnlm_ext, m) {
  m.def(
      "rnn_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? bias, str nonlinearity, "
      "bool reverse, str cuda_path=\"auto\") -> Tensor");
  m.def(
      "rnn_backward(Tensor dout, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor out, "
      "str nonlinearity, bool reverse, bool[] output_mask, str cuda_path=\"auto\") -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // LSTM: bias is b_ih + b_hh [4H]; out, c [T,B,H] every step's h and c; gates [T,B,4H] the
  // activated i, f, g, o when train (kept for the backward), else empty
  m.def(
      "lstm_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, "
      "bool reverse, bool train, str cuda_path=\"auto\") -> (Tensor, Tensor, Tensor)");
  m.def(
      "lstm_backward(Tensor dout, Tensor dc, Tensor x, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor out, Tensor c, Tensor gates, bool reverse, bool[] output_mask, "
      "str cuda_path=\"auto\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // GRU: b_ih, b_hh [3H] apart (b_hn sits inside r ⊙ (…)); saved [T,B,4H] is r, z, n and
  // h_{t-1}·W_hnᵀ + b_hn when train, else empty
  m.def(
      "gru_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool reverse, bool train, str cuda_path=\"auto\") -> (Tensor, Tensor)");
  m.def(
      "gru_backward(Tensor dout, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor out, "
      "Tensor saved, bool reverse, bool[] output_mask, str cuda_path=\"auto\") -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnnlm_ext, CPU, m) {
  m.impl("rnn_forward", &rnn_forward_cpu_op);
  m.impl("rnn_backward", &rnn_backward_cpu_op);
  m.impl("gru_forward", &gru_forward_cpu_op);
  m.impl("gru_backward", &gru_backward_cpu_op);
  m.impl("lstm_forward", &lstm_forward_cpu_op);
  m.impl("lstm_backward", &lstm_backward_cpu_op);
}

}  // namespace rnnlm_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnlm_ext's compiled kernels; importing this module registers torch.ops.rnnlm_ext.*";
  m.def("build_info", &rnnlm_ext::build_info,
        "How this extension was built: compiler, flags, torch version, CPU GEMM and activation "
        "paths, CPU capability, whether CUDA kernels were compiled in.");
}
