// cpu_threads.h — the CPU kernels' thread scheme: how a cell's time loop and the large GEMMs
// around it share the cores. A cell supplies its step and its batched work as callables; the
// schedules here (forward_schedule, backward_schedule) decide which thread runs what.
//
// Waking a thread pool for every step's small GEMM costs more than the GEMM (an OpenMP
// fork/join per step, as a threaded BLAS call does), so the loop is split once, one of two
// ways:
//   columns  each thread owns a slice [c0,c1) of the H hidden columns for the whole sequence,
//            computes its columns of every step with a single-threaded GEMM and the pointwise
//            pass, and meets the others at one barrier per step (the next step reads every
//            column): the CPU counterpart of the persistent GPU kernel. For wide layers.
//   helper   the loop runs on the calling thread, and a helper thread does the large GEMMs
//            around it meanwhile, in chunks of steps. For layers too narrow to share.
//
// Results do not depend on the thread count, as nn.RNN's do not: every piece of work is cut
// by the shape alone (the columns into ColumnBlocks, the steps into chunks), each piece is one
// single-threaded BLAS call (OneBlasThread: a threaded GEMM may split its sums by thread
// count), and sums over pieces run in one fixed order. Threads only choose who runs a piece.
// In a fork()ed child everything runs on the calling thread (libgomp's team does not survive
// fork, and entering a parallel region there hangs).
#pragma once

#include <ATen/Parallel.h>
#include <pthread.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_gemm.h"

namespace rnnlm_ext {
namespace cpu {

constexpr int64_t kColumnAlign = 16;  // blocks are multiples of one AVX-512 vector of floats

// Set in a fork()ed child (pthread_atfork, registered when the extension loads).
inline std::atomic<bool> forked_child{false};
inline const bool fork_handler_registered =
    pthread_atfork(nullptr, nullptr, [] { forked_child.store(true); }) == 0;

// One thread's columns: [c0,c1) of the H hidden units. id numbers the block (ColumnBlocks).
struct Slice {
  int id;
  int64_t c0, c1;
  int64_t size() const { return c1 - c0; }
};

// The H hidden columns cut into blocks of at least kMinSplitColumns (one block below 256),
// boundaries a function of H alone. Every per-column piece of work (a step's GEMM, a weight
// gradient's rows) is one call per block, whichever thread makes it: a GEMM over more
// columns may sum in another order.
constexpr int64_t kMinSplitColumns = 128;
// A block has fewer than 2·kMinSplitColumns columns (blocks of 128 … 255, or one of H < 256).
constexpr int64_t kMaxBlockColumns = 2 * kMinSplitColumns;
class ColumnBlocks {
 public:
  explicit ColumnBlocks(int64_t H) : H_(H), n_(std::max<int64_t>(1, H / kMinSplitColumns)) {}
  int64_t size() const { return n_; }
  Slice operator[](int64_t b) const { return {int(b), bound(b), bound(b + 1)}; }

 private:
  int64_t bound(int64_t b) const {
    return b == n_ ? H_ : b * H_ / n_ / kColumnAlign * kColumnAlign;
  }
  int64_t H_, n_;
};

// How many threads share the time loop by column blocks (1: the loop runs on the calling
// thread, with a helper beside it, below). Sharing needs a step's GEMM (B·H·H multiply-adds)
// large enough that the per-step barrier is small beside it, and enough columns per thread.
// Measured on this project's 2 cores, module forward+backward, two threads sharing columns
// against the helper: 64,64,1024 173 against 177 ms; 64,256,512 206 against 198 ms, 64,64,256
// 13.1 against 11.7 ms, 16,64,256 3.46 against 3.26 ms, 256,32,128 9.4 against 7.5 ms. So two
// threads share from 512 columns each. Three or more share from 128 columns each: the helper
// uses only two threads, and that rule is the earlier one, unmeasured here (2 cores).
constexpr int64_t kMinSplitColumnsOfTwo = 512;
constexpr int64_t kMinSplitWork = int64_t(1) << 19;

inline int column_threads(int64_t B, int64_t H) {
#ifdef _OPENMP
  // the ATen fallback GEMM is not for parallel regions
  if (!have_blas<float>() || forked_child.load(std::memory_order_relaxed)) return 1;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), ColumnBlocks(H).size());
  const bool worth_it = threads >= 3 || (threads == 2 && H >= 2 * kMinSplitColumnsOfTwo);
  return worth_it && B * H * H >= kMinSplitWork ? int(threads) : 1;
#else
  return 1;
#endif
}

// body(id, n) on each of a team of `threads` (n may come out smaller: OMP_THREAD_LIMIT, a
// nested region), every BLAS call in it single-threaded; one thread runs it inline.
template <typename Body>
void parallel(int threads, const Body& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const OneBlasThread one_blas_thread;
      body(omp_get_thread_num(), omp_get_num_threads());
    }
    return;
  }
#endif
  const OneBlasThread one_blas_thread;
  body(0, 1);
}

// prepare(block) once for every column block, then for k = 0 … T-1: before(k, block) on every
// block, a barrier, then after(k, block). Work that reads columns other threads wrote goes
// after the barrier. Each thread takes a run of whole blocks.
template <typename Prepare, typename Before, typename After>
void time_loop(int64_t T, const ColumnBlocks& blocks, int threads, const Prepare& prepare,
               const Before& before, const After& after) {
  parallel(threads, [&](int id, int n) {
    const int64_t b0 = id * blocks.size() / n, b1 = (id + 1) * blocks.size() / n;
    for (int64_t b = b0; b < b1; ++b) prepare(blocks[b]);
    for (int64_t k = 0; k < T; ++k) {
      for (int64_t b = b0; b < b1; ++b) before(k, blocks[b]);
      if (n > 1) {
#pragma omp barrier
      }
      for (int64_t b = b0; b < b1; ++b) after(k, blocks[b]);
    }
  });
}

constexpr auto kNothing = [](int64_t, const Slice&) {};

// The helper scheme: without the helper the large GEMMs ran before or after the loop, which
// left one core idle for the whole loop. The caller never waits for the helper to start
// (waking a thread can take longer than a small layer's whole loop): work either may do is
// claimed, and what the helper has not claimed the caller does itself. So a team of one
// thread (inside another parallel region) is correct too, only not faster.
inline bool can_use_helper() {
#ifdef _OPENMP
  return have_blas<float>() && at::get_num_threads() >= 2 &&
         !forked_child.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// main() on the calling thread, helper() on a second one when the team has two.
template <typename Main, typename Helper>
void with_helper(const Main& main, const Helper& helper) {
#ifdef _OPENMP
#pragma omp parallel num_threads(2)
  {
    const OneBlasThread one_blas_thread;
    if (omp_get_thread_num() == 0) {
      main();
    } else {
      helper();
    }
  }
#else
  main();
#endif
}

// One turn of a wait loop: a pause instruction for the first turns (the other thread is
// normally a step or a chunk away), then yielding the core, so that a waiting thread does not
// hold it from the one it waits for when the machine has more threads than cores.
inline void spin_pause(int64_t& turns) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (++turns < 4096) return _mm_pause();
#endif
  std::this_thread::yield();
}

// Chunks 0 … n-1 of work that two threads claim in order; each chunk runs once, on the thread
// that claimed it. Completion is published with release/acquire, so a thread that sees a chunk
// done sees what its work wrote.
class Chunks {
 public:
  explicit Chunks(int64_t n) : n_(n), done_(new std::atomic<bool>[size_t(n)]) {
    for (int64_t i = 0; i < n; ++i) done_[i].store(false, std::memory_order_relaxed);
  }
  // Claims the next unclaimed chunk and runs work(i) on it; false when none is left.
  template <typename Work>
  bool run_next(const Work& work) {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n_) return false;
    work(i);
    done_[i].store(true, std::memory_order_release);
    return true;
  }
  // Returns once chunk i is done, running unclaimed chunks meanwhile.
  template <typename Work>
  void finish(int64_t i, const Work& work) {
    int64_t turns = 0;
    while (!done_[i].load(std::memory_order_acquire))
      if (!run_next(work)) spin_pause(turns);
  }
  // Runs unclaimed chunks until none is left.
  template <typename Work>
  void run_all(const Work& work) {
    while (run_next(work)) {
    }
  }

 private:
  const int64_t n_;
  std::unique_ptr<std::atomic<bool>[]> done_;
  std::atomic<int64_t> next_{0};
};

// How many steps the backward loop has finished, published the same way.
class Progress {
 public:
  void publish(int64_t steps) { done_.store(steps, std::memory_order_release); }
  void wait_for(int64_t steps) const {
    int64_t turns = 0;
    while (done_.load(std::memory_order_acquire) < steps) spin_pause(turns);
  }

 private:
  std::atomic<int64_t> done_{0};
};

// Steps per chunk of the projection and the weight gradients, on every path: at least 64
// rows. Small chunks keep the helper close behind (backward) or just ahead of (forward) the
// loop, so little of its work is left when the loop ends.
// Module forward+backward with 64- against 256-row chunks: 16,64,256 3.26 against 3.81 ms,
// 64,64,256 11.7 against 12.8 ms, 16,64,64 0.464 against 0.489 ms.
inline int64_t chunk_steps(int64_t B) { return std::max<int64_t>(1, 64 / B); }
// Steps per chunk of dx: rows enough for an efficient GEMM.
inline int64_t input_grad_chunk_steps(int64_t B) { return std::max<int64_t>(1, 256 / B); }

// ----------------------------------------------------------------------------------------
// The schedules. Loop steps count in the order the forward runs them (rnn.h's StepOrder);
// State is a column block's per-sequence step state (the Elman cell's: a StepGemm with its
// block of w_hh packed), default-constructed, one per block.

// The forward: project(s0, s1) computes the input projection of loop steps [s0,s1) (batched,
// any thread); prepare(state, block) runs once per column block; step(s, block, state) runs
// loop step s on the block's columns, after the projection of step s.
template <typename State, typename Project, typename Prepare, typename Step>
void forward_schedule(int64_t T, int64_t B, int64_t H, const Project& project,
                      const Prepare& prepare, const Step& step) {
  const ColumnBlocks blocks(H);
  std::vector<State> states(size_t(blocks.size()));
  const int64_t chunk = chunk_steps(B);
  Chunks projection((T + chunk - 1) / chunk);
  auto project_chunk = [&](int64_t i) { project(i * chunk, std::min(T, (i + 1) * chunk)); };
  auto prepare_block = [&](const Slice& block) { prepare(states[size_t(block.id)], block); };
  auto step_block = [&](int64_t s, const Slice& block) {
    step(s, block, states[size_t(block.id)]);
  };
  const int threads = column_threads(B, H);
  if (threads == 1 && can_use_helper()) {
    // the caller runs the steps; chunks of the projection are claimed by whichever thread gets
    // to them first, the helper ahead of the steps or the caller when it finds its next step's
    // chunk unclaimed
    return with_helper(
        [&] {
          for (int64_t b = 0; b < blocks.size(); ++b) prepare_block(blocks[b]);
          for (int64_t s = 0; s < T; ++s) {
            projection.finish(s / chunk, project_chunk);
            for (int64_t b = 0; b < blocks.size(); ++b) step_block(s, blocks[b]);
          }
        },
        [&] { projection.run_all(project_chunk); });
  }
  parallel(threads, [&](int, int) { projection.run_all(project_chunk); });
  time_loop(T, blocks, threads, prepare_block, step_block, kNothing);
}

// The backward runs the forward's steps in reverse order; k = 0 … T-1 counts them (k = 0 is
// the forward's last step). The cell supplies:
//   prepare(state, block)              once per column block
//   finish(k, block)                   step k's gradient on the block's columns, from what
//                                      reached it
//   carry(k, block, state)             after every block finished step k: the block's columns
//                                      of what step k passes to the step before it
//   initial_state_grad()               after the last step (the gradient of h0)
//   weight_grads(k0, k1, write, block) the weight and bias gradients of steps [k0,k1) for the
//                                      block's hidden units (their rows of each weight
//                                      gradient), written when `write` (the first call), else
//                                      added; each block's calls cover [0,T) in order
//   input_grads(k0, k1)                dx of steps [k0,k1); called only when input_grads_wanted
template <typename State, typename Prepare, typename Finish, typename Carry,
          typename InitialStateGrad, typename WeightGrads, typename InputGrads>
void backward_schedule(int64_t T, int64_t B, int64_t H, bool input_grads_wanted,
                       const Prepare& prepare, const Finish& finish, const Carry& carry,
                       const InitialStateGrad& initial_state_grad, const WeightGrads& weight_grads,
                       const InputGrads& input_grads) {
  const ColumnBlocks blocks(H);
  std::vector<State> states(size_t(blocks.size()));
  auto prepare_block = [&](const Slice& block) { prepare(states[size_t(block.id)], block); };
  auto carry_block = [&](int64_t k, const Slice& block) {
    carry(k, block, states[size_t(block.id)]);
  };
  const int64_t chunk = chunk_steps(B);
  const int64_t dx_chunk = input_grad_chunk_steps(B);
  Chunks dx_chunks(input_grads_wanted ? (T + dx_chunk - 1) / dx_chunk : 0);
  auto dx_work = [&](int64_t i) { input_grads(i * dx_chunk, std::min(T, (i + 1) * dx_chunk)); };
  const int threads = column_threads(B, H);
  if (threads == 1 && can_use_helper()) {
    // the caller runs the steps, then the initial state's gradient and dx; the helper follows
    // the steps, taking the weight and bias gradients of each chunk of finished ones, then
    // whatever chunks of dx the caller has not claimed yet. If the helper has not started by
    // the time the caller is done, the caller takes the weight gradients itself.
    Progress finished;
    std::atomic<bool> weight_grads_taken{false};
    auto chunked_weight_grads = [&] {
      for (int64_t k0 = 0; k0 < T; k0 += chunk) {
        const int64_t k1 = std::min(T, k0 + chunk);
        finished.wait_for(k1);
        for (int64_t b = 0; b < blocks.size(); ++b) weight_grads(k0, k1, k0 == 0, blocks[b]);
      }
    };
    return with_helper(
        [&] {
          for (int64_t b = 0; b < blocks.size(); ++b) prepare_block(blocks[b]);
          for (int64_t k = 0; k < T; ++k) {
            for (int64_t b = 0; b < blocks.size(); ++b) finish(k, blocks[b]);
            finished.publish(k + 1);
            for (int64_t b = 0; b < blocks.size(); ++b) carry_block(k, blocks[b]);
          }
          initial_state_grad();
          dx_chunks.run_all(dx_work);
          if (!weight_grads_taken.exchange(true)) chunked_weight_grads();
        },
        [&] {
          if (!weight_grads_taken.exchange(true)) chunked_weight_grads();
          finished.wait_for(T);  // dx reads every step's gradient
          dx_chunks.run_all(dx_work);
        });
  }
  time_loop(T, blocks, threads, prepare_block, finish, carry_block);
  // The rest is batched over all T·B rows, shared out as whole pieces: each block's weight
  // gradients (its chunks in order), the initial state's gradient, the chunks of dx.
  const int64_t pieces = blocks.size() + 1;
  Chunks batched(pieces);
  auto batched_work = [&](int64_t i) {
    if (i == blocks.size()) return initial_state_grad();
    for (int64_t k0 = 0; k0 < T; k0 += chunk)
      weight_grads(k0, std::min(T, k0 + chunk), k0 == 0, blocks[i]);
  };
  parallel(threads, [&](int, int) {
    batched.run_all(batched_work);
    dx_chunks.run_all(dx_work);
  });
}

}  // namespace cpu
}  // namespace rnnlm_ext
