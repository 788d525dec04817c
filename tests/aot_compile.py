"""Ahead-of-time compile of Triton kernel configurations for a GPU target, without a GPU.

Run as a script (TRITON_INTERPRET must be unset, so the kernels are real JIT functions):
    python tests/aot_compile.py MODULE ARCH     e.g. layer_norm 90
Prints one JSON line per configuration: kernel name, constexprs, num_warps (and num_stages when
given), shared memory bytes, and which tensor-core instructions the PTX uses. The tests run it
with :func:`run_in_subprocesses`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

H100_SHARED_MEMORY = 232448  # bytes of shared memory a block may use on an H100


def run_in_subprocesses(
    module_name: str, archs=(90, 80), timeout: float = 900
) -> dict[int, tuple[str, str, int]]:
    """This script for ``module_name`` and each arch, in concurrent subprocesses with
    TRITON_INTERPRET unset: ``{arch: (stdout, stderr, returncode)}``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        arch: subprocess.Popen(
            [sys.executable, str(Path(__file__)), module_name, str(arch)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in archs
    }
    try:
        return {
            arch: (*proc.communicate(timeout=timeout), proc.returncode)
            for arch, proc in procs.items()
        }
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def compile_all(module_name: str, arch: int) -> list[dict]:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET for AOT compiles"
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    module = importlib.import_module(f"dinov2_fast.kernels.{module_name}")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for kernel, signature, constexprs, num_warps, *extra in module.aot_configurations():
        # Optional extras: num_stages, then the names of the arguments that are multiples of 16
        # (pointers: 16-byte aligned), which the JIT specializes on at run time. Loads are
        # vectorized and software-pipelined only with that knowledge, which costs shared memory.
        options = {"num_warps": num_warps, **({"num_stages": extra[0]} if extra else {})}
        divisible = extra[1] if len(extra) > 1 else ()
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
        source = ASTSource(kernel, signature, constexprs, attrs)
        compiled = triton_compile(source, target=target, options=options)
        ptx = compiled.asm["ptx"]
        results.append(
            {
                "kernel": kernel.__name__,
                "constexprs": {k: v for k, v in constexprs.items() if v is not None},
                "num_warps": num_warps,
                **({"num_stages": extra[0]} if extra else {}),
                "shared": compiled.metadata.shared,
                "wgmma": "wgmma" in ptx,
                "mma": "mma.sync" in ptx,
            }
        )
    return results


if __name__ == "__main__":
    for row in compile_all(sys.argv[1], int(sys.argv[2])):
        print(json.dumps(row))
