"""`dinov2-fast bench head-loss`: the CLI on the CPU (--quick), report and headline, the check that
fails the command when our op is wrong, --shapes and its errors, and gpu_check.sh's step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import _made_up_gpu_report

from dinov2_fast.benchmark import BenchContext
from dinov2_fast.benchmark import head_loss as bench
from dinov2_fast.benchmark.timing import Timer
from dinov2_fast.cli import main

BY_NAME = {provider.name: provider for provider in bench.PROVIDERS}
ROOT = Path(__file__).resolve().parents[1]
# One CPU thread: the steps here are tiny, and two OpenMP threads on a busy machine (other test
# processes) spin-wait for each other, making each step 100x slower.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One `bench head-loss --quick --device cpu --json PATH` run, shared by the tests below."""
    path = tmp_path_factory.mktemp("bench") / "head-loss.json"
    done = subprocess.run(
        [sys.executable, "-m", "dinov2_fast.cli", "bench", "head-loss", "--quick"]
        + ["--device", "cpu", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=ONE_THREAD,
    )
    return done, path


def test_cli_quick_on_cpu_runs_every_provider_but_compile(quick_report, capsys):
    done, path = quick_report
    assert done.returncode == 0, done.stderr
    assert "DINO head + cross-entropy" in done.stdout and "not meaningful" in done.stdout
    assert "torch backend" in done.stdout  # the note: the fused rows did not run Triton
    report = json.loads(path.read_text())
    assert report["device_type"] == "cpu" and report["benchmarks"] == ["head-loss"]
    results = report["results"]
    assert [(r["shape"], r["provider"]) for r in results] == [
        (shape.name, provider.name) for shape in bench.QUICK_SHAPES for provider in bench.PROVIDERS
    ]
    for row in results:
        assert row["benchmark"] == "head-loss" and row["pass"] == "fwd+bwd", row
        assert row["rows"] == 64 and row["bottleneck"] == 64 and row["dtype"] == "bf16"
        assert row["head"] == f"128-128-128-64-{row['prototypes']}"
        provider = BY_NAME[row["provider"]]
        assert row["ours"] == provider.fused and row["baseline"] == provider.baseline
        assert row["teacher"] == ("sinkhorn" if provider.sinkhorn else "centering")
        if provider.compiles:  # torch.compile on the CPU only with --compile
            assert row["status"] == "skipped" and "slow to compile" in row["note"]
            continue
        assert row["status"] == "ok" and row["ms"] > 0 and row["first_call_s"] > 0, row
        assert row["peak_GiB"] is None and row["graph_ms"] is None  # CUDA only
        assert 6 < row["loss"] < 9  # about log K: nearly uniform predictions at initialisation
        assert row["speedup"] > 0
        if provider.fused:  # checked against the torch step on the same inputs
            assert row["backend"] == "torch" and row["check"] == "ok", row
            assert 0 <= row["max_rel_err"] < bench.LOSS_TOLERANCE[torch.bfloat16]
            assert 0 < row["grad_rel_err"] < bench.GRAD_TOLERANCE[torch.bfloat16]
        else:  # the reference
            assert row["backend"] is None and row["check"] is None and row["max_rel_err"] is None
    # The two teachers give different targets, hence different losses.
    loss = {(r["shape"], r["provider"]): r["loss"] for r in results if r["status"] == "ok"}
    for shape in bench.QUICK_SHAPES:
        assert loss[(shape.name, "torch")] != loss[(shape.name, "torch-sinkhorn")]
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fused-sinkhorn" in out and "64x2048x64" in out
    assert main(["report", str(path), "--headline"]) == 0
    assert "head-loss: no numbers to hold against the targets (not a GPU run)" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("fault", ["wrong loss", "raises"])
def test_a_wrong_or_failing_op_fails_the_command(fault, monkeypatch, tmp_path, capsys, one_thread):
    op = bench._op()

    def broken(*args, **kwargs):
        if fault == "raises":
            raise RuntimeError("kernel launch failed")
        loss, mean = op(*args, **kwargs)
        return loss * 1.1, mean

    monkeypatch.setattr(bench, "_op", lambda: broken)
    path = tmp_path / "head-loss.json"
    argv = ["bench", "head-loss", "--quick", "--device", "cpu", "--quiet", "--json", str(path)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "failed (error or MISMATCH), dinov2-fast's own: head-loss/fused" in captured.err
    rows = {r["provider"]: r for r in json.loads(path.read_text())["results"]}
    assert rows["torch"]["status"] == "ok"
    for name in ("fused", "fused-sinkhorn"):
        if fault == "raises":
            assert rows[name]["status"] == "error" and "kernel launch failed" in rows[name]["note"]
        else:
            assert rows[name]["check"] == "MISMATCH" and rows[name]["max_rel_err"] > 0.05
            assert "MISMATCH" in captured.out


def test_shapes_parse_and_bad_shapes_say_what_is_wrong(capsys):
    assert bench.parse_shapes("65536, 2816x131072x256") == [
        bench.Shape(2816, 65536),
        bench.Shape(2816, 131072, 256, hidden=2048, in_dim=1024),
    ]
    assert bench.parse_shapes("64x1024x64")[0].head == "1024-2048-2048-64-1024"
    for text, words in (
        ("2816x65536", "K or ROWSxKxF"),
        ("2816x65536x256x1", "K or ROWSxKxF"),
        ("64k", "K or ROWSxKxF"),
        ("0", "K >= 1"),
        ("2816x0x256", "ROWS >= 1 and K >= 1 and F >= 1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "head-loss", "--shapes", text])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "head-loss shapes" in err and words in err, (text, err)


def test_bare_k_shapes_run_only_this_benchmark(monkeypatch, tmp_path):
    """Without NAME, --shapes runs the benchmarks whose form it is: a bare K is only ours."""
    seen = {}

    def fake_run(names, **kwargs):
        seen["names"], seen["shapes"] = names, kwargs["shapes"]
        return {"results": []}

    monkeypatch.setattr("dinov2_fast.benchmark.run", fake_run)
    assert main(["bench", "--shapes", "4096", "--device", "cpu", "--json", "-"]) == 0
    assert seen["names"] == ["head-loss"] and seen["shapes"] == {
        "head-loss": [bench.Shape(2816, 4096)]
    }


def _gpu_record(provider: str, prototypes: int, ms: float, peak_gib: float, check: str = "ok"):
    record = bench._record(
        BY_NAME[provider],
        bench.Shape(bench.ROWS, prototypes),
        "fwd+bwd",
        "ok",
        torch.bfloat16,
        backend="triton" if provider == "fused" else None,
        ms=ms,
        graph_ms=ms * 0.98,
        peak_GiB=peak_gib,
        loss=11.0,
        check=None if provider == "torch" else check,
        max_rel_err=None if provider == "torch" else 1e-4,
    )
    return record


def test_headline_holds_fused_against_torch_per_k(tmp_path, capsys):
    """From a made-up GPU report (not measured numbers)."""
    results = [
        _gpu_record("torch", 65536, 9.4, 3.27),
        _gpu_record("fused", 65536, 8.0, 0.30),  # 9% of the memory, faster: met
        _gpu_record("torch.compile", 65536, 7.0, 2.0),
        _gpu_record("torch", 131072, 18.1, 6.47),
        _gpu_record("fused", 131072, 20.0, 0.91),  # 14% and 1.10x the time: missed
    ]
    bench._finish(results[:3])
    bench._finish(results[3:])
    assert results[1]["memory_ratio"] == pytest.approx(0.30 / 3.27)
    assert results[1]["speedup"] == pytest.approx(9.4 / 8.0)
    path = _made_up_gpu_report(tmp_path, "head-loss", results)
    assert main(["report", str(path), "--headline"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def row(prototypes: int, provider: str) -> str:  # with rich or plain text
        return next(
            line
            for line in lines
            if line.replace("│", " ").split()[:2] == [str(prototypes), provider]
        )

    assert "met" in row(65536, "fused") and "missed" not in row(65536, "fused")
    assert "9%" in row(65536, "fused") and "0.33 GiB" in row(65536, "fused")
    assert "missed (memory 14% of torch, time 1.10x torch)" in row(131072, "fused")
    assert "61%" in row(65536, "torch.compile")  # its memory against torch's
    assert main(["report", str(path)]) == 0  # the full table reads it too
    assert "131072" in capsys.readouterr().out


def test_headline_falls_back_to_the_targets_numbers_and_flags_mismatch(tmp_path, capsys):
    results = [_gpu_record("fused", 65536, 9.0, 0.2, check="MISMATCH")]
    results += [_gpu_record("fused", 131072, 12.0, 0.5)]  # no torch row: TARGETS.md's numbers
    path = _made_up_gpu_report(tmp_path, "head-loss", results)
    assert main(["report", str(path), "--headline"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH: wrong results" in out
    assert "met (torch not measured: TARGETS.md's numbers)" in out
    assert bench.headline([_gpu_record("torch", 65536, 9.4, 3.27)]) is None


def test_a_compile_is_not_started_close_to_the_deadline(one_thread):
    device = torch.device("cpu")
    timer = Timer.for_device(device, quick=True)
    context = BenchContext(
        device, torch.bfloat16, True, timer, 1.0, compile_on_cpu=True, deadline=time.monotonic() + 5
    )
    compiled = BY_NAME["torch.compile"]
    records = bench._measure(context, compiled, bench.QUICK_SHAPES[0], bench._Run(device))
    assert [r["status"] for r in records] == ["skipped"]
    assert "a compile needs" in records[0]["note"]


def test_gpu_check_dry_run_runs_the_head_loss_step(tmp_path):
    script = ROOT / "bench" / "gpu_check.sh"
    env = {**ONE_THREAD, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(script), "--dry-run"],
        env={**env, "GPU_CHECK_STEPS": "head-loss"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok      bench head-loss --quick (CPU)" in done.stdout
    assert "head-loss: no numbers to hold against the targets" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.log",
        "head-loss.json",
        "summary.txt",
    ]


@pytest.mark.gpu
def test_gpu_records_have_peak_memory_graph_times_and_pass_the_check():
    device = torch.device("cuda", torch.cuda.current_device())
    context = bench.BenchContext(
        device, torch.bfloat16, True, Timer.for_device(device, quick=True), 1000.0
    )
    state = bench._Run(device)
    shape = bench.Shape(512, 16384, 64, hidden=256, in_dim=256)
    records = []
    for name in ("torch", "fused"):
        records += bench._measure(context, BY_NAME[name], shape, state)
    bench._finish(records)
    torch_row, fused = records
    for row in records:
        assert row["status"] == "ok" and row["peak_GiB"] > 0 and row["ms"] > 0, row
    assert fused["backend"] == "triton" and fused["check"] == "ok", fused
    assert fused["memory_ratio"] < 1, (fused, torch_row)  # no [R, K] logits kept
