"""pytest-benchmark suite for one ViT block training step, over the providers of
``dinov2_fast.benchmark.block``.

    pytest bench/bench_block.py --benchmark-only

Not collected by the main test run (``testpaths = ["tests"]``). On a GPU it times the ViT-L block's
forward+backward under bf16 autocast on the batch and the multi-crop inputs at every drop rate
(each call followed by a synchronize, so launch overhead counts too: ``dinov2-fast bench block``
gives the CUDA-event medians, CUDA-graph times and peak memory that RESULTS.md records). Without a
GPU it times ours (through the torch reference of its ops) and the stock block on tiny shapes, to
show that the suite runs. Providers that cannot run here are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from dinov2_fast.benchmark import block as bench
from dinov2_fast.benchmark.timing import synchronized

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
SHAPES = list(bench.SHAPES) if DEVICE.type == "cuda" else list(bench.QUICK_SHAPES)


@pytest.fixture(scope="module")
def models() -> bench.Models:
    """One set of modules for the suite: the compiled block is compiled once per input shape."""
    return bench.Models(DEVICE)


@pytest.mark.parametrize("rate", bench.DROP_RATES, ids=lambda rate: f"p{rate:g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.name)
@pytest.mark.parametrize("provider", bench.PROVIDERS, ids=lambda provider: provider.name)
def test_block(
    benchmark, models: bench.Models, provider: bench.Provider, shape: bench.Shape, rate: float
):
    status, why = bench.provider_status(provider, DEVICE, DTYPE, shape)
    if status != "ok":
        pytest.skip(f"{provider.name}: {why}")
    step = bench.make_step(models, provider, shape, rate, DTYPE)
    step()  # compiles what needs compiling
    benchmark.group = f"block {shape.input} {shape.name} p={rate:g}"
    benchmark.extra_info.update(
        provider=provider.name,
        shape=shape.name,
        drop_rate=rate,
        drop_path=bench.drop_path_kind(provider.name, shape, rate),
        device=str(DEVICE),
    )
    benchmark(synchronized(step, DEVICE))
