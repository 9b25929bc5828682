"""Build hook for the C libraries in csrc/; metadata lives in pyproject.toml.

- the C API library (see csrc/README.md);
- the engine's CPU kernels (csrc/cpu/: decode and prefill attention, the KV-cache store, the log-prob
  head's log-sum-exp, RMSNorm, rotary, sampling; loaded by kernels/cpu_library.py), a plain C library with
  OpenMP: without a compiler the engine runs the same operations as torch code.

The library is a plain shared object (not a Python extension module) that embeds CPython, so it links libpython
and bakes in the path of the python executable doing the build: run from any C program it starts that Python,
whose pyvenv.cfg brings the virtual environment's site-packages. csrc/ has no CUDA sources (none was measured to
beat the Triton kernels), so there is nothing to build or skip for CUDA.
"""
import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

HEADER = "csrc/promptcot_engine.h"


def c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def libpython_link_args() -> dict:
    """The shared libpython when one exists (also beside a statically linked interpreter, where Debian's
    libpython3.x-dev puts it); otherwise the static archive, whole, so that the extension modules the embedded
    interpreter imports find every symbol they need."""
    var = sysconfig.get_config_var
    name = f"python{var('LDVERSION')}"
    candidates = [var("LIBDIR"), os.path.join(var("LIBDIR"), var("MULTIARCH") or ""), var("LIBPL")]
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, f"lib{name}.so")):
            return dict(libraries=[name, "dl"], library_dirs=[directory], runtime_library_dirs=[directory])
    archive = os.path.join(var("LIBPL"), var("LIBRARY"))
    return dict(extra_link_args=["-Wl,--whole-archive", archive, "-Wl,--no-whole-archive",
                                 *shlex.split(f"{var('LIBS')} {var('SYSLIBS')}")])


CAPI = Extension(
    "promptcot_engine.capi.libpromptcot_engine",
    sources=["csrc/promptcot_engine.c"],
    depends=[HEADER],
    include_dirs=["csrc"],
    define_macros=[("PCE_PYTHON_EXECUTABLE", c_string(sys.executable))],
    extra_compile_args=["-fvisibility=hidden"],
    optional=True,  # the Python package installs even where the C library cannot be built
    **libpython_link_args(),
)

CPU_KERNELS = Extension(
    "promptcot_engine.kernels.libpromptcot_cpu",
    sources=sorted(str(p) for p in Path("csrc/cpu").glob("*.c")),
    depends=["csrc/cpu/vector.h", "csrc/cpu/paged_cache.h"],
    include_dirs=["csrc/cpu"],
    extra_compile_args=["-O3", "-fopenmp"],
    extra_link_args=["-fopenmp"],
    optional=True,
)
PLAIN_LIBRARIES = (CAPI, CPU_KERNELS)


class BuildLibraries(build_ext):
    """Builds the plain shared libraries (not Python extension modules) and ships the C API's header beside
    its library in the package."""

    def get_ext_filename(self, fullname):
        # asked with the full dotted name and with its last part alone: a plain .so either way, no ABI suffix
        if any(library.name.endswith(fullname) for library in PLAIN_LIBRARIES):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError) as e:
            if ext is CAPI:
                print(f"\nWARNING: the promptcot_engine C API library was NOT built ({e}).\n"
                      "It needs a C compiler and the Python headers (e.g. apt-get install gcc python3-dev). The "
                      "Python package is installed without it; the C API and its tests fail until it is built.\n",
                      file=sys.stderr)
            else:
                print(f"\nWARNING: the engine's CPU kernels were NOT built ({e}); on CPU the engine runs the same "
                      "operations as torch code, slower.\n", file=sys.stderr)
            return
        if ext is not CAPI:
            return
        include = os.path.join(self.build_lib, "promptcot_engine", "capi", "include")
        os.makedirs(include, exist_ok=True)
        shutil.copy(HEADER, include)


setup(ext_modules=list(PLAIN_LIBRARIES), cmdclass={"build_ext": BuildLibraries})
