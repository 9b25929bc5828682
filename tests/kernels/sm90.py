"""Compiling a Triton kernel for the H100/H200 (sm_90) without a GPU: the interpreter accepts code the GPU
compiler rejects, so each kernel is also compiled as the GPU runs it (no upcast, the GPU tiles) to a cubin.
In a child process without TRITON_INTERPRET, because compiling a kernel with a loop bound computed at run
time fails inside an interpreting process."""
import json
import os
import subprocess
import sys

import pytest

_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, kernel, signature, constexprs, options = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
fn = getattr(importlib.import_module(module), kernel)
compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=options)
print(len(compiled.asm["cubin"]))
"""


def assert_compiles_for_sm90(module: str, kernel: str, signature: dict, constexprs: dict, **options) -> None:
    result = subprocess.run([sys.executable, "-c", _COMPILE, module, kernel, json.dumps(signature),
                             json.dumps(constexprs), json.dumps(options)],
                            env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True)
    if result.returncode and "ptxas" in result.stderr:
        pytest.skip(f"no ptxas to finish the compile: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 0
