"""pytest-benchmark suite for the DINO head + loss step, over the providers of
``dinov2_fast.benchmark.head_loss``.

    pytest bench/bench_head_loss.py --benchmark-only

Not collected by the main test run (``testpaths = ["tests"]``). On a GPU it times the heads and the
cross-entropy, forward+backward under bf16 autocast, at 2816 rows and K = 65536 and 131072 (each
call followed by a synchronize, so launch overhead counts too: ``dinov2-fast bench head-loss``
gives the CUDA-event medians, CUDA-graph times, peak memory and the check against torch that
RESULTS.md records). Without a GPU it times every provider but torch.compile on tiny shapes, the
fused ones through the op's torch backend, to show that the suite runs. Providers that cannot run
here are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from dinov2_fast.benchmark import head_loss as bench
from dinov2_fast.benchmark.timing import synchronized

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
SHAPES = list(bench.SHAPES) if DEVICE.type == "cuda" else list(bench.QUICK_SHAPES)


@pytest.fixture(scope="module")
def inputs() -> dict[bench.Shape, bench.Inputs]:
    """The heads and rows of each shape, built once and shared by its providers."""
    return {}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.name)
@pytest.mark.parametrize("provider", bench.PROVIDERS, ids=lambda provider: provider.name)
def test_head_loss(
    benchmark, inputs: dict[bench.Shape, bench.Inputs], provider: bench.Provider, shape: bench.Shape
):
    status, why = bench.provider_status(provider, DEVICE, DTYPE, shape)
    if status != "ok":
        pytest.skip(f"{provider.name}: {why}")
    if shape not in inputs:
        inputs.clear()  # one shape's heads at a time
        inputs[shape] = bench.Inputs(shape, DEVICE)
    case = bench.make_case(provider, inputs[shape], DTYPE)
    case.step()  # compiles and autotunes what needs it
    benchmark.group = f"head-loss {shape.name}"
    benchmark.extra_info.update(
        provider=provider.name,
        shape=shape.name,
        head=shape.head,
        teacher=provider.teacher,
        backend=bench.op_backend(provider, DEVICE),
        device=str(DEVICE),
    )
    benchmark(synchronized(case.step, DEVICE))
