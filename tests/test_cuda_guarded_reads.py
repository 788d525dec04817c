"""No emulated CUDA kernel reads outside its inputs: every op with a CUDA kernel runs forward and
backward on inputs that end at (or start right after) an inaccessible page, with ragged tails,
misaligned rows and odd sizes. A read past the end faults; the cases run in a subprocess so that a
fault fails the test with the name of the case instead of killing pytest. On a GPU,
compute-sanitizer's memcheck (bench/gpu_check.sh, step sanitize) checks all memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from cuda_emulator import HERE, enabled

CASES = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from cuda_emulator import load_emulated_extension
    from cuda_emulator.guarded import guarded
    from dinov2_fast import _backend
    from dinov2_fast.ops import (
        attention, attention_qkvpacked, index_select_cat, index_select_layer_norm, layer_norm,
        scaled_index_add,
    )

    def run(name, fn, *tensors):
        for side in ("end", "start"):
            print(f"{{name}} ({{side}})", flush=True)
            inputs = [guarded(t, side) for t in tensors]
            leaves = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
            out = fn(*leaves)
            out.backward(guarded(torch.randn(out.shape, dtype=out.dtype), side))

    torch.manual_seed(0)
    half, bf16 = torch.float16, torch.bfloat16
    idx = torch.tensor([4, 0, 2])
    with _backend.emulate_cuda_extension(load_emulated_extension()):
        for shape, dtype in (((1, 37, 2, 64), half), ((2, 21, 1, 128), bf16), ((1, 9, 1, 32), half)):
            qkv = [torch.randn(shape).to(dtype) for _ in range(3)]
            run(f"attention {{shape}}", lambda q, k, v: attention(q, k, v, backend="cuda"), *qkv)
        cu = torch.tensor([0, 5, 6, 76, 78], dtype=torch.int32)
        run(
            "attention packed",
            lambda q, k, v, cu: attention(q, k, v, cu_seqlens=cu, max_seqlen=70, backend="cuda"),
            *[torch.randn(78, 2, 64).to(bf16) for _ in range(3)], cu,
        )
        run(
            "attention_qkvpacked",
            lambda t: attention_qkvpacked(t, backend="cuda"),
            torch.randn(1, 67, 3, 2, 64).to(half),
        )
        for width, dtype in ((100, torch.float32), (7, half), (384, bf16)):
            run(
                f"index_select_cat C={{width}}",
                lambda a, b, i: index_select_cat([a, b], [i, i[1:]], backend="cuda"),
                torch.randn(5, 7, width).to(dtype), torch.randn(3, 13, width).to(dtype), idx,
            )
            run(
                f"scaled_index_add C={{width}}",
                lambda x, i, s, g: scaled_index_add(x, i, s, g, alpha=5 / 3, backend="cuda"),
                torch.randn(5, 13, width).to(dtype), idx, torch.randn(3, 13, width).to(bf16),
                torch.randn(width),
            )
            run(
                f"layer_norm C={{width}}",
                lambda x, w, b: layer_norm(x, w, b, backend="cuda"),
                torch.randn(37, width).to(dtype), torch.randn(width).to(dtype),
                torch.randn(width).to(dtype),
            )
            run(
                f"index_select_layer_norm C={{width}}",
                lambda a, i, w, b: index_select_layer_norm([a], [i], w, b, backend="cuda"),
                torch.randn(5, 7, width).to(dtype), idx, torch.randn(width).to(dtype),
                torch.randn(width).to(dtype),
            )
    print("all cases ran", flush=True)
    """
)


@pytest.mark.skipif(not enabled(), reason="DINOV2_FAST_CUDA_EMULATOR=0")
def test_no_kernel_reads_outside_its_inputs(emulated_cuda_extension):
    code = CASES.format(tests=str(HERE.parent))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    ran = result.stdout.strip().splitlines()
    assert result.returncode == 0 and ran[-1:] == ["all cases ran"], (
        f"exit status {result.returncode} in case {ran[-1] if ran else '(none)'}\n"
        f"stderr:\n{result.stderr[-4000:]}"
    )
