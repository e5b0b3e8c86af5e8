// cpu_workspace.h — scratch memory for the CPU ops, kept between calls (as oneDNN keeps its
// scratchpad). Any op takes a workspace of its own size: Workspace ws(n, options).
//
// Above 32 MB glibc maps fresh pages for every allocation, and the first touch of each page is
// a page fault: a new dz cost 14 ms of a 147 ms backward at T,B,H = 64,256,512 (133 ms reusing
// one). One buffer is kept for the process: a call takes it when it is free, of its dtype and
// large enough (a concurrent call allocates its own), and gives it back; the larger is kept.
// The cache is never destroyed, so no tensor is released during process teardown.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <mutex>
#include <utility>

namespace rnnlm_ext {
namespace cpu {

class WorkspaceCache {
 public:
  at::Tensor take(int64_t n, const at::TensorOptions& options) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (kept_.defined() && kept_.dtype() == options.dtype() && kept_.numel() >= n)
        return std::move(kept_);
    }
    return at::empty({n}, options);
  }
  void give(at::Tensor workspace) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (!kept_.defined() || kept_.dtype() != workspace.dtype() || workspace.numel() > kept_.numel())
      kept_ = std::move(workspace);
  }

  static WorkspaceCache& process() {
    static auto* cache = new WorkspaceCache;  // deliberately never destroyed (see above)
    return *cache;
  }

 private:
  std::mutex mutex_;
  at::Tensor kept_;
};

// n scratch elements of `options`' dtype, taken from the process's cache and given back when
// the Workspace goes out of scope (after the kernel that used it, or on an exception).
class Workspace {
 public:
  Workspace(int64_t n, const at::TensorOptions& options)
      : n_(n), buffer_(WorkspaceCache::process().take(n, options)) {}
  ~Workspace() { WorkspaceCache::process().give(std::move(buffer_)); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // The first n elements as a tensor of shape `sizes` (whose product is n).
  at::Tensor view(at::IntArrayRef sizes) const { return buffer_.narrow(0, 0, n_).view(sizes); }

 private:
  int64_t n_;
  at::Tensor buffer_;
};

}  // namespace cpu
}  // namespace rnnlm_ext
