"""pytest-benchmark suite for attention, over the providers of ``dinov2_fast.benchmark.attention``.

    pytest bench/bench_attention.py --benchmark-only

Not collected by the main test run (``testpaths = ["tests"]``). On a GPU it times the ViT-L global
crops and the packed multi-crop step in bf16 (each call followed by a synchronize, so launch
overhead counts too: ``dinov2-fast bench attention`` gives the CUDA-event medians that RESULTS.md
records). Without a GPU it times the torch providers on tiny shapes, to show that the suite runs;
the GPU kernels are skipped. Providers that cannot run here are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from dinov2_fast.benchmark import attention as bench
from dinov2_fast.benchmark.common import Unavailable
from dinov2_fast.benchmark.timing import synchronized

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
SHAPES = [bench.VIT_L_GLOBAL, bench.MULTI_CROP] if DEVICE.type == "cuda" else bench.QUICK_SHAPES


@pytest.mark.parametrize("pass_", bench.PASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.name)
@pytest.mark.parametrize("provider", bench.PROVIDERS, ids=lambda provider: provider.name)
def test_attention(benchmark, provider: bench.Provider, shape: bench.Shape, pass_: str):
    status, why = bench.provider_status(provider, DEVICE, DTYPE, shape)
    if status != "ok":
        pytest.skip(f"{provider.name}: {why}")
    try:
        case = bench.make_case(provider, shape, device=DEVICE, dtype=DTYPE)
    except Unavailable as why_not:
        pytest.skip(f"{provider.name}: {why_not}")
    timed = synchronized(case.fwd if pass_ == "fwd" else case.fwd_bwd, DEVICE)

    flops = shape.flops(pass_)
    benchmark.group = f"attention {shape.name} {pass_}"
    benchmark.extra_info.update(
        provider=provider.name, shape=shape.name, device=str(DEVICE), flops=flops
    )
    benchmark(timed)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["TFLOPS"] = flops / median_s / 1e12 if median_s > 0 else None
