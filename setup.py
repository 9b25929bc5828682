"""Build hook for the C API library in csrc/ (see csrc/README.md); metadata lives in pyproject.toml."""
from setuptools import setup

setup()
