"""Installs the autofpn package and builds the fused mixed-sum extension autofpn._C from cuda_ext/.

- The CPU kernel (cuda_ext/*.cpp) is always built when the sources are present.
- The CUDA kernel (cuda_ext/*.cu) is added when nvcc and a CUDA toolkit root (the directory holding
  lib64/libcudart, e.g. /usr/local/cuda) are found. A failing CUDA compile fails the build.
- AUTOFPN_NO_EXT=1 skips the extension; autofpn.ops.mixed_sum then uses its PyTorch reference.
- TORCH_CUDA_ARCH_LIST picks the CUDA architectures (default "8.0+PTX": one SASS target plus PTX
  that the driver JIT-compiles for newer GPUs, which keeps the build short).
Without cuda_ext/ sources the package installs alone.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCH_LIST = "8.0+PTX"


def _has_cudart(root):
    return any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib"))


def find_cuda_home():
    """Returns the CUDA toolkit root holding lib64/libcudart, or None when nvcc or it is missing.

    nvcc's grandparent is not always the toolkit root: here /usr/local/bin/nvcc is a wrapper
    script, so torch's own guess (/usr/local) would make the link step fail on -lcudart.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            return root
    return None


def extension_modules():
    """Returns (ext_modules, cmdclass) for autofpn._C, or ([], {}) when it is not built."""
    cpp_sources = sorted(glob.glob(os.path.join("cuda_ext", "*.cpp")))
    if not cpp_sources or os.environ.get("AUTOFPN_NO_EXT") == "1":
        return [], {}
    cu_sources = sorted(glob.glob(os.path.join("cuda_ext", "*.cu")))
    cuda_home = find_cuda_home() if cu_sources else None
    if cuda_home is not None:
        # torch.utils.cpp_extension reads both when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # at::parallel_for (ATen/Parallel-inl.h) runs the kernels' loops on torch's OpenMP threads only
    # when the extension itself is compiled and linked with -fopenmp; without it, it runs them
    # serially (tests/test_extension_parallel.py). Linking libgomp.so.1 reuses the copy torch has
    # already loaded (the same soname), so torch.set_num_threads applies to these loops too.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3"] + openmp
    include_dirs = [os.path.abspath("cuda_ext")]
    if cuda_home is not None:
        print(f"autofpn._C: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        extension = CUDAExtension(
            "autofpn._C", cpp_sources + cu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]}, extra_link_args=openmp)
    else:
        print("autofpn._C: building the CPU kernel only (no nvcc / CUDA toolkit found)")
        extension = CppExtension("autofpn._C", cpp_sources, include_dirs=include_dirs,
                                 extra_compile_args=cxx_flags, extra_link_args=openmp)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="autofpn",
    version="0.1.0",
    description="Auto-FPN: neck and RCNN-head search for two-stage detectors",
    packages=find_packages(include=["autofpn", "autofpn.*"]),
    python_requires=">=3.9",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
