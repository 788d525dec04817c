"""Ahead-of-time compile of Triton kernel configurations for a GPU target, without a GPU.

Run as a script (TRITON_INTERPRET must be unset, so the kernels are real JIT functions):
    python tests/aot_compile.py MODULE ARCH     e.g. layer_norm 90
Prints one JSON line per configuration: kernel name, constexprs, num_warps, shared memory bytes,
and which tensor-core instructions the PTX uses.
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def compile_all(module_name: str, arch: int) -> list[dict]:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET for AOT compiles"
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    module = importlib.import_module(f"dinov2_fast.kernels.{module_name}")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for kernel, signature, constexprs, num_warps in module.aot_configurations():
        source = ASTSource(kernel, signature, constexprs)
        compiled = triton_compile(source, target=target, options={"num_warps": num_warps})
        ptx = compiled.asm["ptx"]
        results.append(
            {
                "kernel": kernel.__name__,
                "constexprs": {k: v for k, v in constexprs.items() if v is not None},
                "num_warps": num_warps,
                "shared": compiled.metadata.shared,
                "wgmma": "wgmma" in ptx,
                "mma": "mma.sync" in ptx,
            }
        )
    return results


if __name__ == "__main__":
    for row in compile_all(sys.argv[1], int(sys.argv[2])):
        print(json.dumps(row))
