"""Large CPU tensors come from glibc's heap, not from fresh mappings, once an engine ran on CPU; and a
memory measurement can hand the kept free memory back first."""
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, torch
from promptcot_engine.engine.cpu_memory import release_free_memory, retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_bytes_while_holding_64_mib():
    x = torch.empty(16 << 20, dtype=torch.float32)
    x.fill_(1)
    held = libc.mallinfo2().hblkhd
    del x
    return held

before = mapped_bytes_while_holding_64_mib()
applied = retain_freed_memory()
after = mapped_bytes_while_holding_64_mib()

def rss_mib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

kept = rss_mib()  # the freed 64 MiB is still resident, kept for reuse
release_free_memory()
print(applied, before >= 64 << 20, after < 64 << 20, kept - rss_mib() > 48)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_tensors_stop_being_mapped_afresh_and_can_be_released():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True", "True"]


def transparent_huge_pages_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")]


def test_kv_cache_memory_is_advised_to_huge_pages():
    """The advice is taken where Linux offers transparent huge pages (always or on madvise), and writing the
    tensor afterwards behaves as for any tensor."""
    import torch

    from promptcot_engine.engine.cpu_memory import advise_huge_pages

    x = torch.empty(8 << 20, dtype=torch.float32)  # 32 MiB: whole huge pages inside it
    taken = advise_huge_pages(x)
    if transparent_huge_pages_mode() in ("always", "madvise"):
        assert taken
    x.copy_(torch.arange(x.numel(), dtype=torch.float32))
    assert x[12345].item() == 12345.0 and x[-1].item() == float(x.numel() - 1)
    assert not advise_huge_pages(torch.empty(100))  # no whole huge page inside: nothing to advise
