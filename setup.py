"""cffi extensions are declared here: setuptools has no pyproject key for them."""
from setuptools import setup

setup(cffi_modules=["experiments/loadgen/loadgen_build.py:ffibuilder", "backends/uring/build.py:ffibuilder",
                    "backends/native_build.py:ffibuilder", "experiments/machine/build.py:ffibuilder"])
