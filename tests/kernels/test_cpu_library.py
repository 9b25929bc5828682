"""The C library of CPU kernels as a whole: built wherever a compiler is, sharing torch's OpenMP runtime."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

from promptcot_engine.kernels import cpu_library


def test_built_where_a_compiler_is():
    """The package builds it with a C compiler; where there is one, a missing library is a build failure, not
    a reason to fall back to torch code in silence."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert cpu_library.CPU_KERNELS_AVAILABLE, f"not built: {cpu_library.LIBRARY_PATH}"


@pytest.mark.skipif(not cpu_library.CPU_KERNELS_AVAILABLE, reason="the CPU kernels are not built (no compiler)")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_shares_torchs_openmp_runtime():
    """Loaded after torch, the library binds to the libgomp torch loaded (same soname, libgomp.so.1): one
    OpenMP thread pool, not two competing for the cores. Wheels that ship a renamed libgomp cannot share."""
    if not (Path(torch.__file__).parent / "lib" / "libgomp.so.1").is_file():
        pytest.skip("this torch does not ship libgomp.so.1 under that soname")
    runtimes = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
    assert len(runtimes) == 1, runtimes
