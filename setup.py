"""Builds rnnlm_ext._C with ninja.

CPU-only torch: a CppExtension from the .cpp files in csrc/.
CUDA torch with nvcc found (CUDA_HOME): a CUDAExtension that adds the .cu files and the CUDA
glue (*_cuda.cpp), for TORCH_CUDA_ARCH_LIST (default "9.0+PTX": Hopper, plus PTX for later GPUs).
RNNLM_EXT_FORCE_CPU=1 builds the CPU extension even where CUDA is available.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
except ModuleNotFoundError:
    # pip's isolated build hides the installed torch, and pyproject.toml does not ask for one:
    # stop before anything is built rather than compile against a torch that will not import it
    sys.exit(
        "rnnlm_ext: torch is not importable here. The extension must be compiled against the torch "
        "that will import it, and an isolated build (plain `pip install .`) cannot see that torch. "
        "Install torch first, then add --no-build-isolation: `pip install --no-build-isolation .`"
    )
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
# torch 2.14's headers require C++20; earlier ones build as C++17
TORCH_MAJOR_MINOR = tuple(map(int, torch.__version__.split(".")[:2]))
CXX_STD = "-std=c++20" if TORCH_MAJOR_MINOR >= (2, 14) else "-std=c++17"


def cuda_wanted() -> bool:
    if os.environ.get("RNNLM_EXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern: str) -> list:
    # relative paths: setuptools refuses absolute ones in an extension's sources
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", pattern)))


def cpu_sources() -> list:
    # *_cuda.cpp is the CUDA glue: it includes CUDA headers, so only the CUDA build compiles it
    return [p for p in sources("*.cpp") if not p.endswith("_cuda.cpp")]


def cublas_paths() -> tuple:
    """(-isystem compile flags, link flags) for cuBLAS where the toolkit lacks it.

    pip's CUDA torch ships the cuBLAS headers and library in site-packages nvidia/*/ (beside
    torch) while a bare toolkit may hold only nvcc and cudart. -isystem puts those headers after
    the toolkit's own, so a header both have comes from the toolkit. The library is linked by
    its versioned name (the wheels have no unversioned libcublas.so); at run time it is the one
    torch has already loaded.
    """
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    compile_flags, link_flags = [], []
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        for include in sorted(glob.glob(os.path.join(nvidia, "*", "include"))):
            compile_flags += ["-isystem", include]
    if not glob.glob(os.path.join(CUDA_HOME, "lib*", "libcublas.so")):
        found = sorted(glob.glob(os.path.join(nvidia, "*", "lib", "libcublas.so.*")))
        if found:
            link_flags = ["-L" + os.path.dirname(found[0]), "-l:" + os.path.basename(found[0])]
    return compile_flags, link_flags or ["-lcublas"]


def extension():
    # -fno-trapping-math, as torch builds itself: without it GCC keeps a select such as the relu
    # backward's `h > 0 ? g : 0` as a branch (a compare may trap), and will not vectorise it.
    cxx_flags = ["-O3", "-fno-trapping-math", CXX_STD]
    openmp_link = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")  # at::parallel_for inside the kernels
        openmp_link = ["-fopenmp"]
    define_macros = [("RNNLM_EXT_BUILD_FLAGS", '"' + " ".join(cxx_flags) + '"')]
    if cuda_wanted():
        # torch reads the arch list when it compiles; sm_90 (the H200 target) + PTX unless asked
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        define_macros.append(("RNNLM_EXT_WITH_CUDA", "1"))
        cublas_compile, cublas_link = cublas_paths()
        # no --use_fast_math: its approximate tanhf would miss the float32 parity tolerance
        nvcc_flags = ["-O3", CXX_STD] + cublas_compile
        return CUDAExtension(
            "rnnlm_ext._C",
            sources("*.cpp") + sources("*.cu"),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags + cublas_compile, "nvcc": nvcc_flags},
            extra_link_args=cublas_link + openmp_link,
        )
    return CppExtension(
        "rnnlm_ext._C",
        cpu_sources(),
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp_link,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
