"""pytest-benchmark suite for a whole ViT's inference and training step, over the providers of
``dinov2_fast.benchmark.model`` (patched and unpatched, eager and with compiled blocks).

    pytest bench/bench_model.py --benchmark-only

Not collected by the main test run (``testpaths = ["tests"]``). On a GPU it times the default
configuration (DINOv2's ViT-L/14 with stock PyTorch blocks, 32 images of 224 px, drop path 0.4,
bf16 autocast), each call followed by a synchronize, so launch overhead counts too:
``dinov2-fast bench model`` gives the CUDA-event medians, CUDA-graph times, peak memory and the
check against float64 that RESULTS.md records. Without a GPU it times the tiny ``--quick`` model on
the CPU, to show that the suite runs. Providers that cannot run here are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from dinov2_fast.benchmark import model as bench
from dinov2_fast.benchmark.timing import synchronized

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
CONFIG = bench.Options().resolve(quick=DEVICE.type != "cuda", on_gpu=DEVICE.type == "cuda")


@pytest.fixture(scope="module")
def models() -> bench.Models:
    """The weights and images of the suite, shared by every provider."""
    return bench.Models(CONFIG, DEVICE)


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    """The model of the provider under test, kept for its passes (compiled once)."""
    return {}


@pytest.mark.parametrize("pass_", bench.PASSES)
@pytest.mark.parametrize("provider", bench.PROVIDERS, ids=lambda provider: provider.name)
def test_model(benchmark, models: bench.Models, built, provider: bench.Provider, pass_: str):
    status, why = bench.provider_status(provider, DEVICE, DTYPE, CONFIG)
    if status != "ok":
        pytest.skip(f"{provider.name}: {why}")
    if provider.name not in built:
        built.clear()  # one model on the device at a time
        built[provider.name] = models.build(provider)[0]
    step = bench.make_step(built[provider.name], CONFIG, pass_, models.images, DTYPE)
    torch.manual_seed(bench.SEED)
    step()  # compiles what needs compiling
    benchmark.group = f"model {CONFIG.name} {pass_}"
    benchmark.extra_info.update(
        provider=provider.name, config=CONFIG.name, pass_=pass_, device=str(DEVICE)
    )
    benchmark(synchronized(step, DEVICE))
