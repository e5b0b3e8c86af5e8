"""Builds rnnlm_ext._C with ninja.

CPU-only torch: a CppExtension from the .cpp files in csrc/.
CUDA torch with nvcc found (CUDA_HOME): a CUDAExtension that adds the .cu files.
RNNLM_EXT_FORCE_CPU=1 builds the CPU extension even where CUDA is available.
"""
import glob
import os
import sys

from setuptools import setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted() -> bool:
    if os.environ.get("RNNLM_EXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern: str) -> list:
    # relative paths: setuptools refuses absolute ones in an extension's sources
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", pattern)))


def extension():
    cxx_flags = ["-O3", "-std=c++17"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")  # at::parallel_for inside the kernels
    define_macros = [("RNNLM_EXT_BUILD_FLAGS", '"' + " ".join(cxx_flags) + '"')]
    if cuda_wanted():
        define_macros.append(("RNNLM_EXT_WITH_CUDA", "1"))
        return CUDAExtension(
            "rnnlm_ext._C",
            sources("*.cpp") + sources("*.cu"),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            libraries=["cublas"],
        )
    return CppExtension(
        "rnnlm_ext._C",
        sources("*.cpp"),
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
