"""pytest-benchmark suite for the stochastic-depth ops, over the providers of
``dinov2_fast.benchmark.stochastic_depth``.

    pytest bench/bench_stochastic_depth.py --benchmark-only

Not collected by the main test run (``testpaths = ["tests"]``). On a GPU it times every op at the
ViT-L multi-crop step (drop rate 0.4) with an fp32 and a bf16 residual stream and a bf16 branch
(each call followed by a synchronize, so launch overhead counts too: ``dinov2-fast bench
stochastic-depth`` gives the CUDA-event and CUDA-graph medians that RESULTS.md records). Without a
GPU it times the torch providers (ours through the torch reference) on tiny shapes, to show that
the suite runs; the GPU kernels are skipped. Providers that cannot run here are skipped with the
reason.
"""

from __future__ import annotations

import pytest
import torch

from dinov2_fast.benchmark import stochastic_depth as bench
from dinov2_fast.benchmark.timing import synchronized

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
SHAPES = [bench.STEP] if DEVICE.type == "cuda" else list(bench.QUICK_SHAPES)
CASES = [
    (workload, pass_) for workload in bench.workloads(SHAPES, DTYPE) for pass_ in workload.passes
]


@pytest.mark.parametrize(
    "workload, pass_", CASES, ids=[f"{w.op}-{w.shape.name}-{w.stream}-{p}" for w, p in CASES]
)
@pytest.mark.parametrize("provider", bench.PROVIDERS, ids=lambda provider: provider.name)
def test_stochastic_depth(
    benchmark, provider: bench.Provider, workload: bench.Workload, pass_: str
):
    status, why = bench.provider_status(provider, DEVICE, DTYPE, workload)
    if status != "ok":
        pytest.skip(f"{provider.name}: {why}")
    case = bench.make_case(provider, workload, device=DEVICE)
    timed = synchronized(case.timed(pass_), DEVICE)
    nbytes = bench.must_move_bytes(workload, pass_)
    benchmark.group = f"stochastic-depth {workload.name} {pass_}"
    benchmark.extra_info.update(
        provider=provider.name,
        op=workload.op,
        shape=workload.shape.name,
        stream=str(workload.stream),
        device=str(DEVICE),
        bytes=nbytes,
    )
    benchmark(timed)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["GBps"] = nbytes / median_s / 1e9 if median_s > 0 else None
