"""Triton kernels of dinov2-fast, installed as ``dinov2_fast.kernels``.

Plain functions on tensors: a ``@triton.jit`` kernel and a launcher that allocates outputs and
picks the grid. No autograd, no validation: ``dinov2_fast.ops`` does both.
"""

import os

# Read when the @triton.jit decorators run, i.e. when a kernel module is first imported: that is
# when Triton decides between compiling for the GPU and interpreting on the CPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Triton's names of the dtypes the kernels take, for the signatures of ahead-of-time compiles.
AOT_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
