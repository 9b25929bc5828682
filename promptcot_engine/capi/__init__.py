"""Where the C API lives once installed: the shared library built by setup.py and its header.

`python -m promptcot_engine.capi --cflags --libs` prints what a C or C++ client compiles and links with."""
from __future__ import annotations

from pathlib import Path

LIBRARY_NAME = "promptcot_engine"
_PACKAGE_DIR = Path(__file__).resolve().parent


def library_path() -> Path:
    path = _PACKAGE_DIR / f"lib{LIBRARY_NAME}.so"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the C library was not built when promptcot_engine was installed (it needs a C "
            "compiler and the Python headers); reinstall with `pip install -v -e .` and read the build log")
    return path


def include_dir() -> Path:
    """The directory holding promptcot_engine.h: inside the package for a wheel install, csrc/ for a source tree."""
    for directory in (_PACKAGE_DIR / "include", _PACKAGE_DIR.parent.parent / "csrc"):
        if (directory / f"{LIBRARY_NAME}.h").is_file():
            return directory
    raise FileNotFoundError(f"{LIBRARY_NAME}.h is missing from {_PACKAGE_DIR / 'include'}: reinstall promptcot_engine")


def cflags() -> str:
    return f"-I{include_dir()}"


def libs() -> str:
    directory = library_path().parent
    return f"-L{directory} -l{LIBRARY_NAME} -Wl,-rpath,{directory}"
