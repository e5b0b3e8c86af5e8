// bench/grid_sync.cu — the time of one grid-wide synchronisation on the persistent RNN kernels'
// grid: the floor of their time per step. A standalone development tool (no torch, no
// rnnlm_ext), built and run by bench/gpu_check.sh:
//
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/grid_sync.cu -o grid_sync && ./grid_sync [steps]
//
// For each dtype and H the persistent kernels can run, the grid is planned as csrc/rnn_cuda.cu's
// plan_persistent plans it (R = ceil(H / SMs) <= 16 rows of w_hh per block, ceil(H / R) blocks
// of 256 threads, R·H scalars of dynamic shared memory; B only gates the plan, B <= 64, so it
// is not a dimension here). Each configuration is first checked (the kernel does synchronise
// the whole grid), then timed: one launch of `steps` grid.sync() calls after a warm-up launch,
// with CUDA events. One result line per configuration; exit status 1 if any check failed.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace cg = cooperative_groups;

constexpr int kThreads = 256;         // kPersistentThreads in csrc/rnn_cuda.cu
constexpr int kMaxRowsPerBlock = 16;  // kMaxRowsPerBlock in csrc/rnn_cuda.cu

#define CHECK_CUDA(call)                                                                   \
  do {                                                                                     \
    const cudaError_t err_ = (call);                                                       \
    if (err_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "grid_sync: %s failed: %s\n", #call, cudaGetErrorString(err_)); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

// Every step, every block adds 1 to *counter; after the grid syncs, each block must read the
// whole step's count. The second sync keeps the next step's additions after every read.
__global__ void __launch_bounds__(kThreads)
    grid_sync_check_kernel(unsigned* counter, unsigned* errors, int steps) {
  cg::grid_group grid = cg::this_grid();
  for (int s = 0; s < steps; ++s) {
    if (threadIdx.x == 0) atomicAdd(counter, 1u);
    grid.sync();
    if (threadIdx.x == 0 && atomicAdd(counter, 0u) != unsigned(s + 1) * gridDim.x)
      atomicAdd(errors, 1u);
    grid.sync();
  }
}

// Grid-wide synchronisation alone: `steps` grid.sync() calls and nothing else.
__global__ void __launch_bounds__(kThreads) grid_sync_kernel(int steps) {
  cg::grid_group grid = cg::this_grid();
  for (int s = 0; s < steps; ++s) grid.sync();
}

struct Plan {
  int grid = 0;  // 0: the persistent kernels cannot run this H
  int rows = 0;
  size_t smem = 0;
};

Plan plan(int H, size_t scalar_bytes, int sms, int smem_optin) {
  Plan p;
  const int rows = (H + sms - 1) / sms;
  if (rows > kMaxRowsPerBlock) return p;
  const size_t smem = size_t(rows) * H * scalar_bytes;
  if (smem > size_t(smem_optin)) return p;
  p.rows = rows;
  p.grid = (H + rows - 1) / rows;
  p.smem = smem;
  return p;
}

bool co_resident(const void* kernel, const Plan& p, int sms, int smem_optin) {
  CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
  int per_sm = 0;
  CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, p.smem));
  return per_sm * sms >= p.grid;
}

// Whether the grid synchronised in every one of `steps` steps.
bool check(const Plan& p, int steps) {
  unsigned* d = nullptr;  // [counter, errors]
  CHECK_CUDA(cudaMalloc(&d, 2 * sizeof(unsigned)));
  CHECK_CUDA(cudaMemset(d, 0, 2 * sizeof(unsigned)));
  unsigned* counter = d;
  unsigned* errors = d + 1;
  void* args[] = {&counter, &errors, &steps};
  CHECK_CUDA(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(grid_sync_check_kernel),
                                         p.grid, kThreads, args, p.smem, nullptr));
  unsigned h[2] = {0, 0};
  CHECK_CUDA(cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(d));
  return h[1] == 0 && h[0] == unsigned(steps) * unsigned(p.grid);
}

// Microseconds per grid.sync(), over one launch of `steps` after a warm-up launch.
float time_us(const Plan& p, int steps) {
  void* args[] = {&steps};
  const void* kernel = reinterpret_cast<const void*>(grid_sync_kernel);
  CHECK_CUDA(cudaLaunchCooperativeKernel(kernel, p.grid, kThreads, args, p.smem, nullptr));
  cudaEvent_t start, end;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&end));
  CHECK_CUDA(cudaEventRecord(start));
  CHECK_CUDA(cudaLaunchCooperativeKernel(kernel, p.grid, kThreads, args, p.smem, nullptr));
  CHECK_CUDA(cudaEventRecord(end));
  CHECK_CUDA(cudaEventSynchronize(end));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, end));
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(end));
  return ms * 1e3f / float(steps);
}

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 1000;
  if (steps < 1) {
    std::fprintf(stderr, "grid_sync: steps must be >= 1, got %s\n", argv[1]);
    return 2;
  }
  int device = 0, cooperative = 0, sms = 0, smem_optin = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  CHECK_CUDA(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CHECK_CUDA(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  std::printf("# grid_sync: %s, %d SMs, %d B shared memory per block, %d steps per launch\n",
              prop.name, sms, smem_optin, steps);
  if (!cooperative) {
    std::fprintf(stderr, "grid_sync: this GPU has no cooperative launch\n");
    return 2;
  }

  const struct {
    const char* name;
    size_t bytes;
  } dtypes[] = {{"float32", 4}, {"bfloat16", 2}, {"float64", 8}};
  const int hidden[] = {128, 256, 512, 1024, 2048};
  bool all_ok = true;
  for (const auto& dtype : dtypes) {
    for (const int H : hidden) {
      const Plan p = plan(H, dtype.bytes, sms, smem_optin);
      if (p.grid == 0) {
        std::printf("grid_sync dtype=%s H=%d: no persistent plan\n", dtype.name, H);
        continue;
      }
      const bool resident =
          co_resident(reinterpret_cast<const void*>(grid_sync_check_kernel), p, sms, smem_optin) &&
          co_resident(reinterpret_cast<const void*>(grid_sync_kernel), p, sms, smem_optin);
      if (!resident) {
        std::printf("grid_sync dtype=%s H=%d grid=%d: not co-resident\n", dtype.name, H, p.grid);
        continue;
      }
      const bool ok = check(p, 100);
      all_ok = all_ok && ok;
      if (!ok) {
        std::printf("grid_sync dtype=%s H=%d grid=%d rows=%d smem=%zu: CHECK FAILED\n", dtype.name,
                    H, p.grid, p.rows, p.smem);
        continue;
      }
      std::printf("grid_sync dtype=%s H=%d grid=%d rows=%d smem=%zu: %.3f us per sync\n",
                  dtype.name, H, p.grid, p.rows, p.smem, time_us(p, steps));
    }
  }
  return all_ok ? 0 : 1;
}
