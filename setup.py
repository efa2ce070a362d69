"""cffi extensions are declared here: setuptools has no pyproject key for them."""
from setuptools import setup

setup(cffi_modules=[])
