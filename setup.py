"""The kernel sources (`csrc/`) ship inside the package as `moecompress/csrc`, in the wheel and the sdist; they are
compiled on first use into a cache (`moecompress/runtime/native.py`), so building needs no compiler and no torch."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["moecompress", "moecompress.*"]), "moecompress.csrc"],
    py_modules=["_moecompress_cli"],  # the command's entry point: handles Ctrl-C while the package imports
    package_dir={"moecompress.csrc": "csrc"},
    package_data={"moecompress.csrc": ["*/*.h", "*/*.cpp", "*/*.cu"]},
)
