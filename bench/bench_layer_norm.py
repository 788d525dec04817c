"""pytest-benchmark suite for LayerNorm, over the providers of ``dinov2_fast.benchmark.layer_norm``.

    pytest bench/bench_layer_norm.py --benchmark-only

Not collected by the main test run (``testpaths = ["tests"]``). On a GPU it times two of the
benchmark's shapes in bf16 (each call followed by a synchronize, so launch overhead counts too:
``dinov2-fast bench`` gives the CUDA-event medians that RESULTS.md records). Without a GPU it times
the torch providers on tiny shapes, to show that the suite runs; the GPU kernels are skipped.
Providers that cannot run here are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from dinov2_fast.benchmark import layer_norm as bench
from dinov2_fast.benchmark.timing import synchronized

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
SHAPES = [(16448, 1024), (16448, 1536)] if DEVICE.type == "cuda" else list(bench.QUICK_SHAPES)


@pytest.mark.parametrize("pass_", bench.PASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("provider", bench.PROVIDERS, ids=lambda provider: provider.name)
def test_layer_norm(benchmark, provider: bench.Provider, shape: tuple[int, int], pass_: str):
    status, why = bench.provider_status(provider, DEVICE, DTYPE)
    if status != "ok":
        pytest.skip(f"{provider.name}: {why}")
    rows, dim = shape
    case = bench.make_case(provider, rows, dim, device=DEVICE, dtype=DTYPE)
    timed = synchronized(case.fwd if pass_ == "fwd" else case.fwd_bwd, DEVICE)
    nbytes = bench.must_move_bytes(pass_, rows, dim, case.in_dtype, case.out_dtype)
    benchmark.group = f"layernorm {rows}x{dim} {pass_}"
    benchmark.extra_info.update(
        provider=provider.name, rows=rows, dim=dim, device=str(DEVICE), bytes=nbytes
    )
    benchmark(timed)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["GBps"] = nbytes / median_s / 1e9 if median_s > 0 else None
