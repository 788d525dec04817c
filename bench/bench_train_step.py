"""pytest-benchmark suite for the whole DINOv2 trainer's step, over the providers of
``dinov2_fast.benchmark.train_step`` (fast, baseline, stock+compile, fast+compile).

    pytest bench/bench_train_step.py --benchmark-only

Not collected by the main test run (``testpaths = ["tests"]``). On a GPU it times the default
configuration (the ``vitl14`` preset: ViT-L/14, 32 images a step with 2 global crops at 224 px and
8 local crops at 98 px, drop path 0.4, bf16 autocast) on one synthetic batch built once on the
device, each step followed by a synchronize: ``dinov2-fast bench train-step`` gives the CUDA-event
medians, peak memory and the ratios against the targets that RESULTS.md records. Without a GPU it
times the tiny ``demo`` preset on the CPU, to show that the suite runs. Providers that cannot run
here are skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools

import pytest
import torch

from dinov2_fast.benchmark import train_step as bench
from dinov2_fast.benchmark.timing import synchronized

pytest.importorskip("pytest_benchmark")
pytest.importorskip("yaml")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
CONFIG = dataclasses.replace(
    bench.Options().resolve(quick=DEVICE.type != "cuda", on_gpu=DEVICE.type == "cuda"),
    precision="bf16" if DEVICE.type == "cuda" else "fp32",
)


@pytest.fixture(scope="module")
def batch() -> dict:
    """The synthetic batch of the suite, shared by every provider."""
    return bench.make_batch(CONFIG, DEVICE)


@pytest.mark.parametrize("provider", bench.PROVIDERS, ids=lambda provider: provider.name)
def test_train_step(benchmark, batch, provider: bench.Provider):
    status, why = bench.provider_status(provider, DEVICE, DTYPE, CONFIG)
    if status != "ok":
        pytest.skip(f"{provider.name}: {why}")
    from dinov2_fast.train.trainer import build_training, training_step

    if provider.compiles:
        torch._dynamo.reset()
    with torch.device(DEVICE):
        training = build_training(bench.training_config(CONFIG, provider), DEVICE)
    training.model.train()
    steps = itertools.count()
    torch.manual_seed(bench.SEED)
    for _ in range(1 + CONFIG.warmup):  # compiles what needs compiling
        training_step(training, batch, next(steps))
    benchmark.group = f"train-step {CONFIG.name}"
    benchmark.extra_info.update(provider=provider.name, config=CONFIG.name, device=str(DEVICE))
    try:
        benchmark(synchronized(lambda: training_step(training, batch, next(steps)), DEVICE))
    finally:
        training = None  # one model on the device at a time
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
