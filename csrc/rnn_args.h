// rnn_args.h — argument checks of the rnnlm_ext ops, shared by the CPU registration (ops.cpp)
// and the CUDA one. Each failure names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "rnn.h"

namespace rnnlm_ext {

struct Dims {
  int64_t T, B, I, H;
};

inline Activation parse_activation(c10::string_view nonlinearity) {
  if (nonlinearity == "tanh") return Activation::Tanh;
  if (nonlinearity == "relu") return Activation::Relu;
  TORCH_CHECK(false, "rnnlm_ext: nonlinearity must be 'tanh' or 'relu', got '",
              std::string(nonlinearity), "'");
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "rnnlm_ext: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type(), "; they must match");
  TORCH_CHECK(t.device() == x.device(), "rnnlm_ext: ", name, " is on ", t.device(), " but x is on ",
              x.device(), "; all tensors must be on one device");
}

// An undefined tensor is what the dispatcher passes for None in a Tensor argument; it reports
// itself as 1-D of shape [0], so name it before any shape check would.
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "rnnlm_ext: ", name, " is required, got None");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "rnnlm_ext: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

// x [T,B,I], h0 [B,H], w_ih [H,I], w_hh [H,H], bias [H] or None.
inline Dims check_forward_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& bias) {
  check_defined(x, "x");
  check_defined(h0, "h0");
  check_defined(w_ih, "w_ih");
  check_defined(w_hh, "w_hh");
  TORCH_CHECK(x.dim() == 3, "rnnlm_ext: x must be 3-D [T,B,I], got ", x.dim(), "-D shape ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "rnnlm_ext: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(w_hh.dim() == 2, "rnnlm_ext: w_hh must be 2-D [H,H], got shape ", w_hh.sizes());
  const Dims d{x.size(0), x.size(1), x.size(2), w_hh.size(0)};
  TORCH_CHECK(d.T >= 1 && d.B >= 1 && d.I >= 1 && d.H >= 1,
              "rnnlm_ext: T, B, I and H must all be >= 1, got x ", x.sizes(), " and w_hh ",
              w_hh.sizes());
  check_shape(w_hh, "w_hh", {d.H, d.H});
  check_shape(w_ih, "w_ih", {d.H, d.I});
  check_shape(h0, "h0", {d.B, d.H});
  check_like(h0, "h0", x);
  check_like(w_ih, "w_ih", x);
  check_like(w_hh, "w_hh", x);
  if (bias) {
    check_shape(*bias, "bias", {d.H});
    check_like(*bias, "bias", x);
  }
  return d;
}

// The backward op also takes dout [T,B,H] and out [T,B,H].
inline Dims check_backward_args(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h0,
                                const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const at::Tensor& out) {
  check_defined(dout, "dout");
  check_defined(out, "out");
  const Dims d = check_forward_args(x, h0, w_ih, w_hh, std::nullopt);
  check_shape(dout, "dout", {d.T, d.B, d.H});
  check_shape(out, "out", {d.T, d.B, d.H});
  check_like(dout, "dout", x);
  check_like(out, "out", x);
  return d;
}

// The forward op's arguments, checked (check_forward_args) and made contiguous: what the CPU
// and the CUDA glue both start from. bias is undefined for None.
struct ForwardArgs {
  Activation act;
  Dims d;
  at::Tensor x, h0, w_ih, w_hh, bias;

  ForwardArgs(const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& w_ih_,
              const at::Tensor& w_hh_, const std::optional<at::Tensor>& bias_,
              c10::string_view nonlinearity)
      : act(parse_activation(nonlinearity)),
        d(check_forward_args(x_, h0_, w_ih_, w_hh_, bias_)),
        x(x_.contiguous()),
        h0(h0_.contiguous()),
        w_ih(w_ih_.contiguous()),
        w_hh(w_hh_.contiguous()),
        bias(bias_ ? bias_->contiguous() : at::Tensor()) {}
};

// The backward op's arguments, checked (check_backward_args) and made contiguous.
struct BackwardArgs {
  Activation act;
  Dims d;
  at::Tensor dout, x, h0, w_ih, w_hh, out;

  BackwardArgs(const at::Tensor& dout_, const at::Tensor& x_, const at::Tensor& h0_,
               const at::Tensor& w_ih_, const at::Tensor& w_hh_, const at::Tensor& out_,
               c10::string_view nonlinearity)
      : act(parse_activation(nonlinearity)),
        d(check_backward_args(dout_, x_, h0_, w_ih_, w_hh_, out_)),
        dout(dout_.contiguous()),
        x(x_.contiguous()),
        h0(h0_.contiguous()),
        w_ih(w_ih_.contiguous()),
        w_hh(w_hh_.contiguous()),
        out(out_.contiguous()) {}
};

// The backward ops' gradients, in their output order (what output_mask's entries ask for)
inline constexpr char kRnnGradNames[] = "dx, dh0, dw_ih, dw_hh, db";
inline constexpr char kGruGradNames[] = "dx, dh0, dw_ih, dw_hh, db_ih, db_hh";
inline constexpr char kLstmGradNames[] = "dx, dh0, dc0, dw_ih, dw_hh, dbias";

// A backward op's output_mask, as the kernels take it. The schemas declare it bool[], not
// bool[N], so that a wrong length reaches this check, which names it, instead of torch's
// list-to-array conversion ("a List with 4 elements to a fixed-size array of size 5").
template <size_t N>
std::array<bool, N> checked_output_mask(const c10::List<bool>& output_mask, const char* entries) {
  TORCH_CHECK(output_mask.size() == N, "rnnlm_ext: output_mask must have ", N, " entries (",
              entries, "), got ", output_mask.size());
  std::array<bool, N> wanted{};
  for (size_t i = 0; i < N; ++i) wanted[i] = output_mask[i];
  return wanted;
}

// A backward op's N gradients in its output order, each of its shape where output_mask asks
// for it, an empty [0] tensor otherwise.
template <size_t N>
struct MaskedGrads {
  std::array<at::Tensor, N> t;
  std::array<bool, N> wanted;

  MaskedGrads(const std::array<std::vector<int64_t>, N>& shapes, std::array<bool, N> output_mask,
              const at::TensorOptions& options)
      : wanted(output_mask) {
    for (size_t i = 0; i < N; ++i)
      t[i] = at::empty(wanted[i] ? at::IntArrayRef(shapes[i]) : at::IntArrayRef{0}, options);
  }
  // where the kernel writes gradient i, nullptr for one not asked for
  void* ptr(size_t i) { return wanted[i] ? t[i].data_ptr() : nullptr; }
  auto tuple() const {
    return std::apply([](const auto&... g) { return std::make_tuple(g...); }, t);
  }
};

// Each backward op's gradients (CPU and CUDA alike), from its dims and its output_mask,
// whose length is checked here.
inline MaskedGrads<5> rnn_grads(const Dims& d, const c10::List<bool>& output_mask,
                                const at::TensorOptions& options) {
  return MaskedGrads<5>({{{d.T, d.B, d.I}, {d.B, d.H}, {d.H, d.I}, {d.H, d.H}, {d.H}}},
                        checked_output_mask<5>(output_mask, kRnnGradNames), options);
}
inline MaskedGrads<6> gru_grads(const Dims& d, const c10::List<bool>& output_mask,
                                const at::TensorOptions& options) {
  const int64_t G = 3 * d.H;
  return MaskedGrads<6>({{{d.T, d.B, d.I}, {d.B, d.H}, {G, d.I}, {G, d.H}, {G}, {G}}},
                        checked_output_mask<6>(output_mask, kGruGradNames), options);
}
inline MaskedGrads<6> lstm_grads(const Dims& d, const c10::List<bool>& output_mask,
                                 const at::TensorOptions& options) {
  const int64_t G = 4 * d.H;
  return MaskedGrads<6>({{{d.T, d.B, d.I}, {d.B, d.H}, {d.B, d.H}, {G, d.I}, {G, d.H}, {G}}},
                        checked_output_mask<6>(output_mask, kLstmGradNames), options);
}

// ----------------------------------------------------------------------------------------
// Gated cells: the weights stack `gates` blocks of H rows (LSTM 4, GRU 3).

// x [T,B,I], h0 [B,H], w_ih [gates·H,I], w_hh [gates·H,H]; H is w_hh's column count.
inline Dims check_gated_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, int64_t gates) {
  TORCH_CHECK(x.dim() == 3, "rnnlm_ext: x must be 3-D [T,B,I], got ", x.dim(), "-D shape ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "rnnlm_ext: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(w_hh.dim() == 2, "rnnlm_ext: w_hh must be 2-D [", gates, "H,H], got shape ",
              w_hh.sizes());
  const Dims d{x.size(0), x.size(1), x.size(2), w_hh.size(1)};
  TORCH_CHECK(d.T >= 1 && d.B >= 1 && d.I >= 1 && d.H >= 1,
              "rnnlm_ext: T, B, I and H must all be >= 1, got x ", x.sizes(), " and w_hh ",
              w_hh.sizes());
  check_shape(w_hh, "w_hh", {gates * d.H, d.H});
  check_shape(w_ih, "w_ih", {gates * d.H, d.I});
  check_shape(h0, "h0", {d.B, d.H});
  check_like(h0, "h0", x);
  check_like(w_ih, "w_ih", x);
  check_like(w_hh, "w_hh", x);
  return d;
}

// GRU (gru.h): the above with 3 gates, and b_ih, b_hh [3H], both or neither.
inline Dims check_gru_forward_args(const at::Tensor& x, const at::Tensor& h0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                   const std::optional<at::Tensor>& b_ih,
                                   const std::optional<at::Tensor>& b_hh) {
  const Dims d = check_gated_args(x, h0, w_ih, w_hh, 3);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "rnnlm_ext: b_ih and b_hh must be both given or both None, got b_ih ",
              b_ih ? "given" : "None", " and b_hh ", b_hh ? "given" : "None");
  if (b_ih) {
    check_shape(*b_ih, "b_ih", {3 * d.H});
    check_like(*b_ih, "b_ih", x);
    check_shape(*b_hh, "b_hh", {3 * d.H});
    check_like(*b_hh, "b_hh", x);
  }
  return d;
}

// The GRU forward op's arguments, checked and made contiguous; b_ih, b_hh undefined for None.
struct GruForwardArgs {
  Dims d;
  at::Tensor x, h0, w_ih, w_hh, b_ih, b_hh;

  GruForwardArgs(const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& w_ih_,
                 const at::Tensor& w_hh_, const std::optional<at::Tensor>& b_ih_,
                 const std::optional<at::Tensor>& b_hh_)
      : d(check_gru_forward_args(x_, h0_, w_ih_, w_hh_, b_ih_, b_hh_)),
        x(x_.contiguous()),
        h0(h0_.contiguous()),
        w_ih(w_ih_.contiguous()),
        w_hh(w_hh_.contiguous()),
        b_ih(b_ih_ ? b_ih_->contiguous() : at::Tensor()),
        b_hh(b_hh_ ? b_hh_->contiguous() : at::Tensor()) {}
};

// The GRU backward op's arguments: also dout [T,B,H], out [T,B,H] and saved [T,B,4H].
struct GruBackwardArgs {
  Dims d;
  at::Tensor dout, x, h0, w_ih, w_hh, out, saved;

  GruBackwardArgs(const at::Tensor& dout_, const at::Tensor& x_, const at::Tensor& h0_,
                  const at::Tensor& w_ih_, const at::Tensor& w_hh_, const at::Tensor& out_,
                  const at::Tensor& saved_)
      : d(check_gated_args(x_, h0_, w_ih_, w_hh_, 3)),
        dout(dout_.contiguous()),
        x(x_.contiguous()),
        h0(h0_.contiguous()),
        w_ih(w_ih_.contiguous()),
        w_hh(w_hh_.contiguous()),
        out(out_.contiguous()),
        saved(saved_.contiguous()) {
    check_shape(dout_, "dout", {d.T, d.B, d.H});
    check_shape(out_, "out", {d.T, d.B, d.H});
    const std::vector<int64_t> saved_shape{d.T, d.B, 4 * d.H};
    TORCH_CHECK(saved_.sizes() == at::IntArrayRef(saved_shape), "rnnlm_ext: saved must have shape ",
                saved_shape, " [T,B,4H] (what gru_forward returns with train=True), got ",
                saved_.sizes());
    check_like(dout_, "dout", x_);
    check_like(out_, "out", x_);
    check_like(saved_, "saved", x_);
  }
};

// The LSTM forward op's arguments (lstm.h): the gated checks with 4 gates, c0 [B,H] and
// bias [4H] (b_ih + b_hh) or None; made contiguous, bias undefined for None.
struct LstmForwardArgs {
  Dims d;
  at::Tensor x, h0, c0, w_ih, w_hh, bias;

  LstmForwardArgs(const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& c0_,
                  const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                  const std::optional<at::Tensor>& bias_)
      : d(check_gated_args(x_, h0_, w_ih_, w_hh_, 4)),
        x(x_.contiguous()),
        h0(h0_.contiguous()),
        c0(c0_.contiguous()),
        w_ih(w_ih_.contiguous()),
        w_hh(w_hh_.contiguous()),
        bias(bias_ ? bias_->contiguous() : at::Tensor()) {
    check_shape(c0_, "c0", {d.B, d.H});
    check_like(c0_, "c0", x_);
    if (bias_) {
      check_shape(*bias_, "bias", {4 * d.H});
      check_like(*bias_, "bias", x_);
    }
  }
};

// The LSTM backward op's arguments: also dout, out, c [T,B,H], gates [T,B,4H], and dc
// [T,B,H] or an empty [0] tensor (no gradient reached c: zero, left undefined here).
struct LstmBackwardArgs {
  LstmForwardArgs f;
  at::Tensor dout, dc, out, c, gates;

  LstmBackwardArgs(const at::Tensor& dout_, const at::Tensor& dc_, const at::Tensor& x_,
                   const at::Tensor& h0_, const at::Tensor& c0_, const at::Tensor& w_ih_,
                   const at::Tensor& w_hh_, const at::Tensor& out_, const at::Tensor& c_,
                   const at::Tensor& gates_)
      : f(x_, h0_, c0_, w_ih_, w_hh_, std::nullopt),
        dout(dout_.contiguous()),
        dc(dc_.numel() == 0 && dc_.dim() == 1 ? at::Tensor() : dc_.contiguous()),
        out(out_.contiguous()),
        c(c_.contiguous()),
        gates(gates_.contiguous()) {
    const Dims& d = f.d;
    check_shape(dout_, "dout", {d.T, d.B, d.H});
    if (dc.defined())
      TORCH_CHECK(dc_.sizes() == at::IntArrayRef({d.T, d.B, d.H}), "rnnlm_ext: dc must have shape ",
                  at::IntArrayRef({d.T, d.B, d.H}), " or [0] (no gradient), got ", dc_.sizes());
    check_shape(out_, "out", {d.T, d.B, d.H});
    check_shape(c_, "c", {d.T, d.B, d.H});
    const std::vector<int64_t> gates_shape{d.T, d.B, 4 * d.H};
    TORCH_CHECK(gates_.sizes() == at::IntArrayRef(gates_shape), "rnnlm_ext: gates must have shape ",
                gates_shape, " [T,B,4H] (what lstm_forward returns with train=True), got ",
                gates_.sizes());
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{dout_, "dout"},
                                  {dc_, "dc"},
                                  {out_, "out"},
                                  {c_, "c"},
                                  {gates_, "gates"}})
      check_like(t, name, x_);
  }
};

}  // namespace rnnlm_ext
