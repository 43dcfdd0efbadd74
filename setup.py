"""Installs the autofpn package. The fused mixed-op extension (autofpn._C) is built from
cuda_ext/ when its sources are present; without them the package installs alone."""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("cuda_ext", "*.cpp")))
if sources and os.environ.get("AUTOFPN_NO_EXT") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(CppExtension("autofpn._C", sources, extra_compile_args=["-O3"]))
    cmdclass["build_ext"] = BuildExtension

setup(
    name="autofpn",
    version="0.1.0",
    description="Auto-FPN: neck and RCNN-head search for two-stage detectors",
    packages=find_packages(include=["autofpn", "autofpn.*"]),
    python_requires=">=3.9",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
