// rnn_cuda.cu — whole-sequence forward and backward of one Elman RNN layer on a CUDA GPU.
// Dimensions and layouts: rnn.h; the launchers' contract: rnn_cuda.h. Order: dispatch and
// activations, pointwise kernels, persistent kernels, planning (which path runs, on what
// grid), forward, backward, the launchers. Steps run in rnn.h's StepOrder: loop step s at time
// index t = order.time(s), reversed layers from t = T-1 down, no tensor flipped. The helpers
// the LSTM and GRU kernels (cells_cuda.cu) share are in cuda_common.h.
//
// Where the time goes: as on the CPU, the input projection and the four weight/input
// gradients are large cuBLAS GEMMs over all T·B rows; only the per-step product with w_hh is
// sequential. Per step, the per-step path costs a GEMM launch plus a pointwise launch; the
// persistent path costs one grid-wide synchronisation, with w_hh read from shared memory
// instead of from L2/HBM at every step.
#include "rnn_cuda.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda_common.h"

namespace rnnlm_ext {
namespace {

namespace cg = cooperative_groups;

template <typename scalar_t, Activation act>
struct Tag {
  using scalar = scalar_t;
  static constexpr Activation activation = act;
};

// Calls f(Tag<scalar_t, act>{}) for the runtime dtype and activation.
template <typename F>
void dispatch(DType dtype, Activation act, const F& f) {
  dispatch_dtype(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::scalar;
    if (act == Activation::Tanh) return f(Tag<scalar_t, Activation::Tanh>{});
    return f(Tag<scalar_t, Activation::Relu>{});
  });
}

// ----------------------------------------------------------------------------------------
// Activations, in acc_t. relu keeps NaN (z < 0 is false), as std::max(z, 0) on the CPU.

template <Activation act, typename acc_t>
__device__ acc_t activate(acc_t z) {
  if constexpr (act == Activation::Tanh) return tanh_acc(z);
  else return z < acc_t(0) ? acc_t(0) : z;
}

// In the forward pass this was h = act(z), so now dz = g ⊙ act'(z), with act' taken from the
// saved output h: tanh' = 1 − h², relu' = [h > 0].
template <Activation act, typename acc_t>
__device__ acc_t activate_backward(acc_t g, acc_t h) {
  if constexpr (act == Activation::Tanh) return g * (acc_t(1) - h * h);
  else return h > acc_t(0) ? g : acc_t(0);
}

// ----------------------------------------------------------------------------------------
// Pointwise kernels of the per-step path, over one step's [B,H] block of n = B·H elements.

// In the forward pass: h = act(h + b) in place (h holds P_t + h_{t-1}·w_hhᵀ on entry).
// h: [B,H], b: [H] or nullptr.
template <typename scalar_t, Activation act>
__global__ void bias_act_forward_kernel(scalar_t* h, const scalar_t* b, int64_t n, int64_t H) {
  using Tr = Traits<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    typename Tr::acc_t z = Tr::load(h[i]);
    if (b) z += Tr::load(b[i % H]);
    h[i] = Tr::store(activate<act>(z));
  }
}

// dz = (carry + dout) ⊙ act'(h). dz holds the carried gradient dz_{t+1}·w_hh on entry when
// `carry` is true, and is overwritten. dz, dout, h: [B,H].
template <typename scalar_t, Activation act>
__global__ void act_backward_kernel(scalar_t* dz, const scalar_t* dout, const scalar_t* h,
                                    bool carry, int64_t n) {
  using Tr = Traits<scalar_t>;
  using acc_t = typename Tr::acc_t;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t g = (carry ? Tr::load(dz[i]) : acc_t(0)) + Tr::load(dout[i]);
    dz[i] = Tr::store(activate_backward<act>(g, Tr::load(h[i])));
  }
}

// ----------------------------------------------------------------------------------------
// Persistent kernels: one cooperative launch runs all T steps. Block k owns the R hidden
// units j0 = k·R … j0+R-1 (the last block fewer) and keeps the R matching rows of w_hh (w_hhᵀ
// in the backward) in shared memory for the whole sequence. Each warp computes, for one batch
// row b at a time, the R dot products of that row of the previous state with those R rows.
// The state of step t is written by every block, so after writing it the grid synchronises
// before step t+1 reads it; those reads bypass L1 (__ldcg), which is not coherent across SMs.

constexpr int kPersistentThreads = 256;  // 8 warps; one block per SM
constexpr int kMaxRowsPerBlock = 16;     // R <= 16: the R accumulators stay in registers
constexpr int64_t kPersistentMaxB = 64;  // above this, cuBLAS's tensor-core GEMM per step wins

// acc[r] += Σ_k v[k]·w_s[r·H + k] for r < rows, summed over the warp: every lane ends with all
// the sums, because the butterfly (__shfl_xor_sync over offsets 16 … 1) adds each lane's partial
// into every other lane's, unlike a shuffle-down tree that leaves the total in lane 0 alone.
// v: [H] in global memory, w_s: [rows,H] in shared memory.
template <typename scalar_t>
__device__ void warp_dot_rows(typename Traits<scalar_t>::acc_t (&acc)[kMaxRowsPerBlock],
                              const scalar_t* v, const scalar_t* w_s, int rows, int64_t H,
                              int lane) {
  using Tr = Traits<scalar_t>;
  for (int64_t k = lane; k < H; k += 32) {
    const typename Tr::acc_t vk = Tr::load(__ldcg(v + k));
#pragma unroll
    for (int r = 0; r < kMaxRowsPerBlock; ++r)
      if (r < rows) acc[r] += vk * Tr::load(w_s[r * H + k]);
  }
#pragma unroll
  for (int r = 0; r < kMaxRowsPerBlock; ++r)
    for (int offset = 16; offset > 0; offset /= 2)
      acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
}

// Forward, steps as in rnn_forward_cpu. out: [T,B,H] holds P = x·w_ihᵀ on entry and every
// h_t on return. h0 [B,H], w_hh [H,H], b [H] or nullptr. Shared memory: R·H scalars.
template <typename scalar_t, Activation act>
__global__ void __launch_bounds__(kPersistentThreads)
    rnn_forward_persistent_kernel(scalar_t* out, const scalar_t* h0, const scalar_t* w_hh,
                                  const scalar_t* b, int64_t T, int64_t B, int64_t H, int R,
                                  bool reverse) {
  using Tr = Traits<scalar_t>;
  using acc_t = typename Tr::acc_t;
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);  // [rows,H]: rows j0… of w_hh
  const int64_t j0 = int64_t(blockIdx.x) * R;
  const int rows = int(min(int64_t(R), H - j0));
  for (int64_t i = threadIdx.x; i < rows * H; i += blockDim.x) w_s[i] = w_hh[j0 * H + i];
  __syncthreads();

  cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t BH = B * H;
  const StepOrder order{T, reverse};
  for (int64_t s = 0; s < T; ++s) {
    const scalar_t* h_prev = s == 0 ? h0 : out + order.prev_time(s) * BH;  // [B,H]
    scalar_t* h = out + order.time(s) * BH;                                // [B,H]
    for (int64_t bi = warp; bi < B; bi += warps) {
      acc_t acc[kMaxRowsPerBlock] = {};
      warp_dot_rows(acc, h_prev + bi * H, w_s, rows, H, lane);  // (h_{t-1}·w_hhᵀ)[bi, j0…]
      // every lane holds every sum (warp_dot_rows), so any lane may finish a unit: lane r
      // finishes unit j0+r (r < R <= 16 < 32), spreading the R stores over R lanes
#pragma unroll
      for (int r = 0; r < kMaxRowsPerBlock; ++r) {
        if (r < rows && lane == r) {
          const int64_t i = bi * H + j0 + r;
          acc_t z = acc[r] + Tr::load(h[i]);
          if (b) z += Tr::load(b[j0 + r]);
          h[i] = Tr::store(activate<act>(z));
        }
      }
    }
    grid.sync();
  }
}

// Backward recurrence, steps as in rnn_backward_cpu: writes dz [T,B,H] and, when not nullptr,
// dh0 = dz_first·w_hh [B,H]. dout, out: [T,B,H], w_hh [H,H]. Shared memory: R·H scalars.
template <typename scalar_t, Activation act>
__global__ void __launch_bounds__(kPersistentThreads)
    rnn_backward_persistent_kernel(scalar_t* dh0, scalar_t* dz, const scalar_t* dout,
                                   const scalar_t* w_hh, const scalar_t* out, int64_t T, int64_t B,
                                   int64_t H, int R, bool reverse) {
  using Tr = Traits<scalar_t>;
  using acc_t = typename Tr::acc_t;
  extern __shared__ __align__(16) unsigned char smem[];
  // [rows,H]: rows j0… of w_hhᵀ, so that (dz_t·w_hh)[b, j0+r] = Σ_k dz_t[b,k]·w_s[r,k]
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);
  const int64_t j0 = int64_t(blockIdx.x) * R;
  const int rows = int(min(int64_t(R), H - j0));
  for (int64_t i = threadIdx.x; i < rows * H; i += blockDim.x) {
    const int64_t r = i / H, k = i % H;
    w_s[i] = w_hh[k * H + j0 + r];
  }
  __syncthreads();

  cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t BH = B * H;
  const StepOrder order{T, reverse};
  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = order.time(s);
    const bool carry = s != T - 1;
    // dz of loop step s+1, the step that read this one's output
    const scalar_t* dz_next = carry ? dz + order.time(s + 1) * BH : nullptr;  // [B,H]
    for (int64_t bi = warp; bi < B; bi += warps) {
      // in the forward pass this was h_t = act(P_t + h_{t-1}·w_hhᵀ + b), so
      // dz_t = (dout_t + dz_{t+1}·w_hh) ⊙ act'(h_t)
      acc_t acc[kMaxRowsPerBlock] = {};
      if (carry) warp_dot_rows(acc, dz_next + bi * H, w_s, rows, H, lane);
      // lane r finishes unit j0+r, as in the forward
#pragma unroll
      for (int r = 0; r < kMaxRowsPerBlock; ++r) {
        if (r < rows && lane == r) {
          const int64_t i = t * BH + bi * H + j0 + r;
          dz[i] = Tr::store(activate_backward<act>(acc[r] + Tr::load(dout[i]), Tr::load(out[i])));
        }
      }
    }
    grid.sync();
  }
  if (dh0) {
    const scalar_t* dz_first = dz + order.first_time() * BH;  // the step that read h0
    for (int64_t bi = warp; bi < B; bi += warps) {
      acc_t acc[kMaxRowsPerBlock] = {};
      warp_dot_rows(acc, dz_first + bi * H, w_s, rows, H, lane);
#pragma unroll
      for (int r = 0; r < kMaxRowsPerBlock; ++r)
        if (r < rows && lane == r) dh0[bi * H + j0 + r] = Tr::store(acc[r]);
    }
  }
}

// ----------------------------------------------------------------------------------------
// Planning: whether the persistent kernels can run a shape on the current GPU, on which grid,
// and which path a call takes. Host code only; it comes after the kernels because a plan
// holds only if every kernel that may run it keeps the whole grid resident.

// Grid of the persistent kernels for (B, H) on the current device; grid == 0 where they
// cannot run (see rnn_persistent_fits in rnn_cuda.h).
struct PersistentPlan {
  int grid = 0;
  int rows = 0;     // R, rows of w_hh per block
  size_t smem = 0;  // bytes of dynamic shared memory per block
};

// The current GPU's properties that a persistent grid is planned against.
struct DeviceLimits {
  int cooperative = 0;  // cooperative launch supported
  int sms = 0;          // streaming multiprocessors
  int smem_optin = 0;   // the most dynamic shared memory a block may opt in to
};

DeviceLimits device_limits() {
  int device = 0;
  DeviceLimits d;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&d.cooperative, cudaDevAttrCooperativeLaunch, device),
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  return d;
}

// Whether `grid` blocks of `kernel` with `smem` bytes of dynamic shared memory can all be
// resident at once, as a cooperative launch needs. The kernel's shared memory limit is raised
// to the device's maximum first (the same value for every call, so that concurrent callers
// never lower it under each other).
bool co_resident(const void* kernel, size_t smem, int grid, const DeviceLimits& d) {
  check_cuda(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, d.smem_optin),
      "cudaFuncSetAttribute");
  int per_sm = 0;
  check_cuda(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads, smem),
      "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return int64_t(per_sm) * d.sms >= grid;
}

template <typename scalar_t>
PersistentPlan plan_persistent(int64_t B, int64_t H) {
  if (B > kPersistentMaxB) return {};
  const DeviceLimits d = device_limits();
  if (!d.cooperative || d.sms < 1) return {};
  const int64_t rows = (H + d.sms - 1) / d.sms;
  if (rows > kMaxRowsPerBlock) return {};
  PersistentPlan plan;
  plan.rows = int(rows);
  plan.grid = int((H + rows - 1) / rows);
  plan.smem = size_t(rows * H) * sizeof(scalar_t);
  if (plan.smem > size_t(d.smem_optin)) return {};
  // every kernel that may run this plan must keep the whole grid resident
  const void* kernels[] = {
      reinterpret_cast<const void*>(rnn_forward_persistent_kernel<scalar_t, Activation::Tanh>),
      reinterpret_cast<const void*>(rnn_forward_persistent_kernel<scalar_t, Activation::Relu>),
      reinterpret_cast<const void*>(rnn_backward_persistent_kernel<scalar_t, Activation::Tanh>),
      reinterpret_cast<const void*>(rnn_backward_persistent_kernel<scalar_t, Activation::Relu>)};
  for (const void* kernel : kernels)
    if (!co_resident(kernel, plan.smem, plan.grid, d)) return {};
  return plan;
}

// The plan to run: none for PerStep, the persistent one for Auto where it fits.
template <typename scalar_t>
PersistentPlan choose_plan(CudaPath path, int64_t B, int64_t H) {
  if (path == CudaPath::PerStep) return {};
  const PersistentPlan plan = plan_persistent<scalar_t>(B, H);
  if (path == CudaPath::Persistent && plan.grid == 0)
    throw std::runtime_error(
        "rnnlm_ext: the persistent CUDA path was asked for, but its kernels cannot run B = " +
        std::to_string(B) + ", H = " + std::to_string(H) +
        " in this dtype on this GPU (see rnnlm_ext.ops.cuda_path)");
  return plan;
}

// ----------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, Activation act>
void rnn_forward(scalar_t* out, const scalar_t* x, const scalar_t* h0, const scalar_t* w_ih,
                 const scalar_t* w_hh, const scalar_t* b, int64_t T, int64_t B, int64_t I,
                 int64_t H, bool reverse, CudaPath path, cudaStream_t stream,
                 cublasHandle_t handle) {
  const int64_t BH = B * H;
  // P = x·w_ihᵀ for all T·B rows at once, written straight into out: [T·B,I]·[I,H] -> [T·B,H]
  gemm<scalar_t>(handle, false, true, T * B, H, I, x, I, w_ih, I, 0, out, H);
  const PersistentPlan plan = choose_plan<scalar_t>(path, B, H);
  if (plan.grid > 0) {
    int R = plan.rows;
    void* args[] = {&out, &h0, &w_hh, &b, &T, &B, &H, &R, &reverse};
    check_cuda(cudaLaunchCooperativeKernel(
                   reinterpret_cast<const void*>(rnn_forward_persistent_kernel<scalar_t, act>),
                   plan.grid, kPersistentThreads, args, plan.smem, stream),
               "cudaLaunchCooperativeKernel (rnn_forward_persistent_kernel)");
    return;
  }
  const StepOrder order{T, reverse};
  for (int64_t s = 0; s < T; ++s) {
    const scalar_t* h_prev = s == 0 ? h0 : out + order.prev_time(s) * BH;       // [B,H]
    scalar_t* h = out + order.time(s) * BH;                                     // [B,H]
    gemm<scalar_t>(handle, false, true, B, H, H, h_prev, H, w_hh, H, 1, h, H);  // h += h_prev·w_hhᵀ
    bias_act_forward_kernel<scalar_t, act>
        <<<pointwise_blocks(BH), kPointwiseThreads, 0, stream>>>(h, b, BH, H);
    check_cuda(cudaGetLastError(), "bias_act_forward_kernel launch");
  }
}

// ----------------------------------------------------------------------------------------
// Backward

template <typename scalar_t, Activation act>
void rnn_backward(scalar_t* dx, scalar_t* dh0, scalar_t* dw_ih, scalar_t* dw_hh, scalar_t* db,
                  scalar_t* dz, const scalar_t* dout, const scalar_t* x, const scalar_t* h0,
                  const scalar_t* w_ih, const scalar_t* w_hh, const scalar_t* out, int64_t T,
                  int64_t B, int64_t I, int64_t H, bool reverse, CudaPath path, cudaStream_t stream,
                  cublasHandle_t handle) {
  const int64_t BH = B * H;
  const StepOrder order{T, reverse};
  const PersistentPlan plan = choose_plan<scalar_t>(path, B, H);
  if (plan.grid > 0) {
    int R = plan.rows;
    void* args[] = {&dh0, &dz, &dout, &w_hh, &out, &T, &B, &H, &R, &reverse};
    check_cuda(cudaLaunchCooperativeKernel(
                   reinterpret_cast<const void*>(rnn_backward_persistent_kernel<scalar_t, act>),
                   plan.grid, kPersistentThreads, args, plan.smem, stream),
               "cudaLaunchCooperativeKernel (rnn_backward_persistent_kernel)");
  } else {
    // The forward's loop steps in reverse order.
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = order.time(s);
      // in the forward pass this was h_t = act(P_t + h_{t-1}·w_hhᵀ + b), so dz_t = dh_t ⊙
      // act'(h_t) with dh_t = dout_t + dz_{t+1}·w_hh (the carry, already in dz_t except at
      // the last step)
      act_backward_kernel<scalar_t, act><<<pointwise_blocks(BH), kPointwiseThreads, 0, stream>>>(
          dz + t * BH, dout + t * BH, out + t * BH, s != T - 1, BH);
      check_cuda(cudaGetLastError(), "act_backward_kernel launch");
      if (s > 0) {
        // ... and through h_{t-1}·w_hhᵀ: carry dz_t·w_hh into the previous step's slot
        gemm<scalar_t>(handle, false, false, B, H, H, dz + t * BH, H, w_hh, H, 0,
                       dz + order.prev_time(s) * BH, H);
      }
    }
    if (dh0)
      gemm<scalar_t>(handle, false, false, B, H, H, dz + order.first_time() * BH, H, w_hh, H, 0,
                     dh0, H);
  }

  // The rest is batched over all T·B rows.
  if (dw_ih) gemm<scalar_t>(handle, true, false, H, I, T * B, dz, H, x, I, 0, dw_ih, I);  // dzᵀ·x
  if (dw_hh) {  // Σ_t dz_tᵀ·h_{t-1}: the step that read h0, then the rows of out
    const PrevStates p = split_prev_states(order, 0, T);
    gemm<scalar_t>(handle, true, false, H, H, B, dz + p.first * BH, H, h0, H, 0, dw_hh, H);
    if (p.hi > p.lo)
      gemm<scalar_t>(handle, true, false, H, H, (p.hi - p.lo) * B, dz + p.lo * BH, H,
                     out + p.prev_of_lo * BH, H, 1, dw_hh, H);
  }
  if (db) column_sum<scalar_t>(db, dz, T * B, H, H, stream);
  if (dx) gemm<scalar_t>(handle, false, false, T * B, I, H, dz, H, w_ih, I, 0, dx, I);  // dz·w_ih
}

}  // namespace

// ----------------------------------------------------------------------------------------
// Launchers

bool rnn_persistent_fits(int64_t B, int64_t H, DType dtype) {
  bool fits = false;
  dispatch(dtype, Activation::Tanh, [&](auto tag) {
    using scalar_t = typename decltype(tag)::scalar;
    fits = plan_persistent<scalar_t>(B, H).grid > 0;
  });
  return fits;
}

void rnn_forward_cuda(void* out, const void* x, const void* h0, const void* w_ih, const void* w_hh,
                      const void* b, int64_t T, int64_t B, int64_t I, int64_t H, DType dtype,
                      Activation act, bool reverse, CudaPath path, cudaStream_t stream,
                      cublasHandle_t handle) {
  check_int_range(T, B, I, H);
  set_stream(handle, stream);
  dispatch(dtype, act, [&](auto tag) {
    using scalar_t = typename decltype(tag)::scalar;
    rnn_forward<scalar_t, decltype(tag)::activation>(
        static_cast<scalar_t*>(out), static_cast<const scalar_t*>(x),
        static_cast<const scalar_t*>(h0), static_cast<const scalar_t*>(w_ih),
        static_cast<const scalar_t*>(w_hh), static_cast<const scalar_t*>(b), T, B, I, H, reverse,
        path, stream, handle);
  });
}

void rnn_backward_cuda(void* dx, void* dh0, void* dw_ih, void* dw_hh, void* db, void* dz,
                       const void* dout, const void* x, const void* h0, const void* w_ih,
                       const void* w_hh, const void* out, int64_t T, int64_t B, int64_t I,
                       int64_t H, DType dtype, Activation act, bool reverse, CudaPath path,
                       cudaStream_t stream, cublasHandle_t handle) {
  check_int_range(T, B, I, H);
  set_stream(handle, stream);
  dispatch(dtype, act, [&](auto tag) {
    using scalar_t = typename decltype(tag)::scalar;
    rnn_backward<scalar_t, decltype(tag)::activation>(
        static_cast<scalar_t*>(dx), static_cast<scalar_t*>(dh0), static_cast<scalar_t*>(dw_ih),
        static_cast<scalar_t*>(dw_hh), static_cast<scalar_t*>(db), static_cast<scalar_t*>(dz),
        static_cast<const scalar_t*>(dout), static_cast<const scalar_t*>(x),
        static_cast<const scalar_t*>(h0), static_cast<const scalar_t*>(w_ih),
        static_cast<const scalar_t*>(w_hh), static_cast<const scalar_t*>(out), T, B, I, H, reverse,
        path, stream, handle);
  });
}

}  // namespace rnnlm_ext
