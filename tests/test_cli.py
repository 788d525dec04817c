"""The `dinov2-fast` command: info, bench (--quick runs on the CPU) and report, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2_fast import benchmark
from dinov2_fast.benchmark import attention, block, stochastic_depth
from dinov2_fast.benchmark.timing import Timer
from dinov2_fast.cli import main

HAS_GPU = torch.cuda.is_available()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dinov2_fast.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One `bench layernorm --quick --device cpu --json PATH` run, shared by the tests below."""
    path = tmp_path_factory.mktemp("bench") / "layernorm.json"
    done = _cli("bench", "layernorm", "--quick", "--device", "cpu", "--json", str(path))
    return done, path


@pytest.fixture(scope="module")
def attention_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One `bench attention --quick --device cpu --json PATH` run, shared by the tests below."""
    path = tmp_path_factory.mktemp("bench") / "attention.json"
    done = _cli("bench", "attention", "--quick", "--device", "cpu", "--json", str(path))
    return done, path


@pytest.fixture(scope="module")
def stochastic_depth_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One `bench stochastic-depth --quick --device cpu --json PATH` run."""
    path = tmp_path_factory.mktemp("bench") / "stochastic-depth.json"
    done = _cli("bench", "stochastic-depth", "--quick", "--device", "cpu", "--json", str(path))
    return done, path


@pytest.fixture(scope="module")
def block_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One `bench block --quick --device cpu --json PATH` run."""
    path = tmp_path_factory.mktemp("bench") / "block.json"
    done = _cli("bench", "block", "--quick", "--device", "cpu", "--json", str(path))
    return done, path


def test_info_prints_versions_gpus_and_backends(tmp_path):
    path = tmp_path / "info.json"
    done = _cli("info", "--json", str(path))
    assert done.returncode == 0, done.stderr
    for words in ("versions", "torch", "triton", "backends", "CUDA tensors", "CPU tensors", "apex"):
        assert words in done.stdout
    if not HAS_GPU:
        assert "no CUDA GPU" in done.stdout
    info = json.loads(path.read_text())
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["backends"]) == {"torch", "triton", "cuda"}
    for where in info["backends"].values():
        assert set(where) == {"cuda", "cpu"}
    assert info["backends"]["torch"]["cpu"] == ""  # the reference runs everywhere
    assert set(info["optional_libraries"]) >= {"apex", "liger_kernel", "flash_attn", "xformers"}
    assert len(info["gpus"]) == (torch.cuda.device_count() if HAS_GPU else 0)


def test_info_json_to_stdout_is_only_json():
    done = _cli("info", "--json", "-")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["versions"]["dinov2_fast"]


def test_bench_quick_on_cpu_times_torch_and_not_the_gpu_kernels(quick_report):
    done, path = quick_report
    assert done.returncode == 0, done.stderr
    assert "LayerNorm" in done.stdout and "not timed: no CUDA GPU" in done.stdout
    report = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "copy_bandwidth_GBps", "results"):
        assert key in report
    assert report["device_type"] == "cpu" and report["copy_bandwidth_GBps"] > 0
    results = report["results"]
    torch_rows = [r for r in results if r["provider"] == "torch"]
    assert {r["pass"] for r in torch_rows} == {"fwd", "fwd+bwd"}
    for row in torch_rows:
        assert row["status"] == "ok" and row["ms"] > 0 and row["GBps"] > 0
        assert row["check"] == "ok" and row["bytes"] == row["rows"] * row["dim"] * (
            4 if row["pass"] == "fwd" else 10
        )
    autocast = [r for r in results if r["provider"] == "torch+autocast" and r["status"] == "ok"]
    assert autocast and all(r["in_dtype"] == "fp32" for r in autocast)
    kernel_rows = [r for r in results if r["provider"] in ("triton", "cuda", "triton+autocast")]
    assert kernel_rows
    for row in kernel_rows:
        assert row["status"] == "not timed" and "no CUDA GPU" in row["note"]
        assert row["ms"] is None


def test_report_prints_a_saved_run(quick_report, capsys):
    _, path = quick_report
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "LayerNorm" in out and "torch+autocast" in out
    assert main(["report", str(path), "--headline"]) == 0
    assert "not a GPU run" in capsys.readouterr().out


def test_bench_attention_quick_on_cpu_times_torch_and_not_the_kernels(attention_report, capsys):
    done, path = attention_report
    assert done.returncode == 0, done.stderr
    assert "Attention" in done.stdout and "not timed: no CUDA GPU" in done.stdout
    report = json.loads(path.read_text())
    assert report["device_type"] == "cpu" and report["benchmarks"] == ["attention"]
    results = report["results"]
    assert {r["shape"] for r in results} == {shape.name for shape in attention.QUICK_SHAPES}
    torch_rows = [r for r in results if r["provider"] in ("naive", "sdpa-math")]
    assert len(torch_rows) == 2 * 2 * len(attention.QUICK_SHAPES)  # providers x passes x shapes
    for row in torch_rows:
        assert row["status"] == "ok" and row["ms"] > 0 and row["TFLOPS"] > 0, row
        assert row["check"] == "ok" and row["max_rel_err"] < 3e-2
        forward = sum(4 * b * row["heads"] * n * n * row["head_dim"] for b, n in row["groups"])
        assert row["flops"] == (forward if row["pass"] == "fwd" else 3.5 * forward)
        assert row["baseline"] == "sdpa-math" and row["speedup"] > 0  # no sdpa-cudnn on a CPU
        assert row["peak_MiB"] is None  # CUDA only
    packed = [r for r in torch_rows if r["packed"]]
    assert packed and all(r["calls"] == 2 and len(r["groups"]) == 2 for r in packed)
    for name in ("triton", "cuda", "triton-memeff", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient"):
        rows = [r for r in results if r["provider"] == name]
        assert rows and all(r["status"] == "not timed" and r["ms"] is None for r in rows)
        assert all("no CUDA GPU" in r["note"] for r in rows)
    assert main(["report", str(path), "--headline"]) == 0
    assert "attention: no numbers to hold against the targets (not a GPU run)" in (
        capsys.readouterr().out
    )


def test_time_limit_records_what_it_left_out():
    report = benchmark.run(["attention"], device=torch.device("cpu"), quick=True, time_limit_s=1e-9)
    assert report["time_limit_s"] == 1e-9 and report["results"]
    timed_here = [r for r in report["results"] if r["provider"] in ("naive", "sdpa-math")]
    assert timed_here and all(r["status"] == "skipped" for r in timed_here)
    assert all("out of time" in r["note"] for r in timed_here)


def test_bench_stochastic_depth_quick_on_cpu_times_the_torch_paths(stochastic_depth_report, capsys):
    done, path = stochastic_depth_report
    assert done.returncode == 0, done.stderr
    assert "Stochastic depth" in done.stdout and "torch reference" in done.stdout
    report = json.loads(path.read_text())
    assert report["device_type"] == "cpu" and report["benchmarks"] == ["stochastic-depth"]
    results = report["results"]
    shape = stochastic_depth.QUICK_SHAPES[0]
    expected = {
        (op, stream, pass_)
        for op in stochastic_depth.OPS
        for stream in ("fp32", "bf16")
        for pass_ in (("fwd",) if op.endswith("inplace") else ("fwd", "fwd+bwd"))
    }
    for provider in ("ours", "torch"):  # ours: backend "auto", the torch reference on the CPU
        rows = [r for r in results if r["provider"] == provider]
        assert {(r["op"], r["stream_dtype"], r["pass"]) for r in rows} == expected
        for row in rows:
            assert row["status"] == "ok" and row["check"] == "ok", row
            assert row["ms"] > 0 and row["GBps"] > 0 and row["graph_ms"] is None  # CUDA only
            assert row["kept"] == list(shape.kept) and row["branch_dtype"] == "bf16"
            assert row["ours"] == (provider == "ours")
            assert row["backend"] == ("torch" if provider == "ours" else None)
    # The byte model, from the module docstring, for the fp32 stream and the bf16 branch.
    big, kept = shape.elements, shape.kept_elements
    bytes_of = {
        (r["op"], r["pass"]): r["bytes"]
        for r in results
        if r["provider"] == "torch" and r["stream_dtype"] == "fp32"
    }
    assert bytes_of[("index_select_cat", "fwd")] == 2 * kept * 4
    assert bytes_of[("index_select_cat", "fwd+bwd")] == (3 * kept + big) * 4
    assert bytes_of[("index_select_layer_norm", "fwd")] == kept * (4 + 2)
    assert bytes_of[("index_select_layer_norm", "fwd+bwd")] == kept * (2 * 4 + 2 * 2) + big * 4
    assert bytes_of[("scaled_index_add", "fwd")] == 2 * big * 4 + kept * 2
    assert bytes_of[("scaled_index_add", "fwd+bwd")] == 2 * big * 4 + kept * (4 + 3 * 2)
    assert bytes_of[("scaled_index_add_inplace", "fwd")] == kept * (2 * 4 + 2)
    for provider in ("triton", "cuda"):  # each backend by name: GPU only
        rows = [r for r in results if r["provider"] == provider]
        assert rows and all(r["status"] == "not timed" and r["ours"] for r in rows)
    compiled = [r for r in results if r["provider"] == "torch.compile"]
    assert compiled and all(r["status"] == "skipped" for r in compiled)
    assert main(["report", str(path), "--headline"]) == 0
    assert "stochastic-depth: no numbers to hold against the targets (not a GPU run)" in (
        capsys.readouterr().out
    )


def test_bench_block_quick_on_cpu_times_ours_and_stock(block_report, capsys):
    done, path = block_report
    assert done.returncode == 0, done.stderr
    assert "ViT block training step" in done.stdout
    report = json.loads(path.read_text())
    assert report["device_type"] == "cpu" and report["benchmarks"] == ["block"]
    results = report["results"]
    for provider in ("ours", "torch"):
        for shape in block.QUICK_SHAPES:
            rows = [r for r in results if r["provider"] == provider and r["shape"] == shape.name]
            assert [r["drop_rate"] for r in rows] == list(block.DROP_RATES)  # sorted by rate
            for row in rows:
                assert row["status"] == "ok" and row["check"] == "ok", row
                assert row["pass"] == "fwd+bwd" and row["max_rel_err"] < 3e-2
                assert row["ms"] > 0 and row["time_ratio"] > 0 and row["speedup"] > 0
                assert row["peak_MiB"] is None and row["memory_ratio"] is None  # CUDA only
                assert row["input"] == ("multi-crop" if shape.multi_crop else "batch")
            assert rows[0]["time_ratio"] == 1.0 and rows[0]["drop_path"] == "none"
            kinds = [r["drop_path"] for r in rows[1:]]
            if provider == "torch":
                assert kinds == ["mask"] * 3 and rows[0]["calls"] == len(shape.groups)
            elif shape.multi_crop:  # ours packs the list: one call, subsets at every p > 0
                assert kinds == ["subset"] * 3 and rows[0]["calls"] == 1
            else:
                assert kinds == ["mask", "subset", "subset"]
                batch = shape.groups[0][0]
                assert rows[-1]["kept"] == [max(int(batch * 0.6), 1)]
    compiled = [r for r in results if r["provider"] == "torch.compile"]
    assert compiled and all(r["status"] == "skipped" for r in compiled)
    assert main(["report", str(path), "--headline"]) == 0
    assert "block: no numbers to hold against the targets (not a GPU run)" in (
        capsys.readouterr().out
    )


def test_block_time_limit_records_what_it_left_out():
    report = benchmark.run(["block"], device=torch.device("cpu"), quick=True, time_limit_s=1e-9)
    rows = [r for r in report["results"] if r["provider"] in ("ours", "torch")]
    assert len(rows) == 2 * len(block.QUICK_SHAPES) * len(block.DROP_RATES)
    assert all(r["status"] == "skipped" and "out of time" in r["note"] for r in rows)


def test_cuda_graph_timing_is_cuda_only():
    ms, why = Timer.for_device(torch.device("cpu"), quick=True).graph_ms(lambda: None)
    assert ms is None and "CUDA" in why


@pytest.mark.gpu
def test_cuda_graph_timing_replays_a_capture_and_survives_a_failed_one():
    device = torch.device("cuda", torch.cuda.current_device())
    timer = Timer.for_device(device, quick=True)
    x = torch.randn(1 << 20, device=device, requires_grad=True)
    w = torch.randn(1 << 20, device=device, requires_grad=True)

    def fwd_bwd():  # autograd inside the capture: the gradients are created by the function
        return torch.autograd.grad((x * w).sum(), [x, w])

    ms, why = timer.graph_ms(fwd_bwd)
    assert why == "" and ms is not None and ms > 0
    ms, why = timer.graph_ms(lambda: x.sum().item())  # reads on the host: cannot be captured
    assert ms is None and why.startswith("CUDA graph capture failed")
    assert torch.ones(3, device=device).sum().item() == 3  # the device still works


@pytest.mark.gpu
def test_gpu_records_have_graph_times_and_peak_memory():
    device = torch.device("cuda", torch.cuda.current_device())
    context = benchmark.BenchContext(
        device, torch.bfloat16, True, Timer.for_device(device, quick=True), 1000.0
    )
    workload = stochastic_depth.Workload(
        "scaled_index_add", stochastic_depth.QUICK_SHAPES[0], torch.float32, torch.bfloat16
    )
    torch_eager = next(p for p in stochastic_depth.PROVIDERS if p.name == "torch")
    records = stochastic_depth._measure(context, torch_eager, workload)
    assert [r["status"] for r in records] == ["ok", "ok"] and all(
        r["check"] == "ok" for r in records
    )
    assert all(r["graph_ms"] is not None and r["graph_ms"] > 0 for r in records), records
    shape = block.QUICK_SHAPES[1]
    stock = next(p for p in block.PROVIDERS if p.name == "torch")
    records = block._measure(context, stock, shape, block.Models(device))
    assert len(records) == len(block.DROP_RATES)
    for record in records:
        assert record["status"] == "ok" and record["check"] == "ok", record
        assert record["peak_MiB"] > 0 and record["graph_ms"] is not None, record


def test_a_backend_of_ours_without_a_kernel_for_the_op_is_skipped(monkeypatch):
    from dinov2_fast import _backend

    monkeypatch.setattr(_backend, "unavailable_reason", lambda backend, device: "")
    preference = {**_backend.AUTO_PREFERENCE, "attention": ("triton", "torch")}
    monkeypatch.setattr(_backend, "AUTO_PREFERENCE", preference)
    cuda = torch.device("cuda")
    provider = next(p for p in attention.PROVIDERS if p.name == "cuda")
    shape = attention.VIT_L_GLOBAL
    assert attention.provider_status(provider, cuda, torch.bfloat16, shape) == (
        "skipped",
        "attention has no cuda kernel yet",
    )
    preference["attention"] = ("triton", "cuda", "torch")
    assert attention.provider_status(provider, cuda, torch.bfloat16, shape) == ("ok", "")
    assert attention.provider_status(provider, cuda, torch.float32, shape) == (
        "skipped",
        "the CUDA attention kernels take fp16 and bf16",
    )
    ours = next(p for p in stochastic_depth.PROVIDERS if p.name == "cuda")
    workload = stochastic_depth.Workload(
        "index_select_layer_norm", stochastic_depth.STEP, torch.float32, torch.bfloat16
    )
    preference["index_select_layer_norm"] = ("triton", "torch")
    assert stochastic_depth.provider_status(ours, cuda, torch.bfloat16, workload) == (
        "skipped",
        "index_select_layer_norm has no cuda kernel yet",
    )


def test_stochastic_depth_and_block_shapes_parse():
    assert stochastic_depth.parse_shapes("64x257x1024+256x50x1024") == [stochastic_depth.STEP]
    assert block.parse_shapes("64x257x1024, 64x257x1024+256x50x1024") == [
        block.BATCH,
        block.MULTI_CROP,
    ]


def _record(provider: str, ms: float, *, autocast: bool = False, speedup: float | None = None):
    rows, dim = 16448, 1024
    nbytes = rows * dim * (16 if autocast else 10)
    return {
        "benchmark": "layernorm",
        "provider": provider,
        "ours": provider.split("+")[0] in ("triton", "cuda"),
        "pass": "fwd+bwd",
        "rows": rows,
        "dim": dim,
        "shape": f"{rows}x{dim}",
        "dtype": "bf16",
        "in_dtype": "fp32" if autocast else "bf16",
        "out_dtype": "bf16",
        "status": "ok",
        "ms": ms,
        "bytes": nbytes,
        "GBps": nbytes / (ms * 1e-3) / 1e9,
        "copy_fraction": 0.5,
        "baseline": "torch+autocast" if autocast else "torch",
        "speedup": speedup,
        "max_rel_err": 1e-3,
        "param_rel_err": 1e-3,
        "check": "ok",
        "note": "",
    }


def _made_up_gpu_report(tmp_path: Path, name: str, results: list[dict]) -> Path:
    """A report as `bench NAME --json` would write it on a GPU, with made-up ``results``."""
    report = {
        "date": "2026-01-01T00:00:00+00:00",
        "device": "made-up GPU",
        "device_type": "cuda",
        "torch": torch.__version__,
        "triton": "3.6.0",
        "dtype": "bf16",
        "copy_bandwidth_GBps": 3000.0,
        "benchmarks": [name],
        "notes": [],
        "results": results,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


def test_headline_holds_our_kernels_against_the_targets(tmp_path, capsys):
    """The GPU-only part of the report, from a made-up GPU report (not measured numbers)."""
    results = [
        _record("torch", 0.158, speedup=1.0),
        _record("triton", 0.065, speedup=0.158 / 0.065),  # 2.6 TB/s
        _record("cuda", 0.080, speedup=0.158 / 0.080),  # 2.1 TB/s
        _record("torch+autocast", 0.371, autocast=True, speedup=1.0),
        _record("triton+autocast", 0.100, autocast=True, speedup=3.71),
        _record("cuda+autocast", 0.200, autocast=True, speedup=1.86),
    ]
    path = _made_up_gpu_report(tmp_path, "layernorm", results)
    assert main(["report", str(path), "--headline"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def row(provider: str) -> str:  # the table's line for provider, with rich or plain text
        return next(line for line in lines if line.replace("│", " ").split()[:1] == [provider])

    assert "goal met" in row("triton") and "2.59" in row("triton")
    assert "floor met" in row("cuda")
    assert "met" in row("triton+autocast") and "below" not in row("triton+autocast")
    assert "below target" in row("cuda+autocast")


def _attention_record(provider: str, shape: attention.Shape, pass_: str, ms: float):
    flops = shape.flops(pass_)
    return {
        "benchmark": "attention",
        "provider": provider,
        "ours": provider.startswith("triton"),
        "pass": pass_,
        "shape": shape.name,
        "groups": [list(group) for group in shape.groups],
        "packed": shape.packed,
        "heads": shape.heads,
        "head_dim": shape.head_dim,
        "dtype": "bf16",
        "status": "ok",
        "ms": ms,
        "flops": flops,
        "TFLOPS": flops / (ms * 1e-3) / 1e12,
        "peak_MiB": 150.0,
        "baseline": "sdpa-cudnn",
        "speedup": None,
        "max_rel_err": 4e-3,
        "check": "ok",
        "note": "",
    }


def test_attention_headline_holds_our_kernel_against_the_targets(tmp_path, capsys):
    """From a made-up GPU report (not measured numbers)."""
    records = [
        _attention_record("triton", attention.VIT_L_GLOBAL, "fwd+bwd", 0.25),  # goal 0.30
        _attention_record("sdpa-cudnn", attention.VIT_L_GLOBAL, "fwd+bwd", 0.47),
        _attention_record("triton", attention.MULTI_CROP, "fwd+bwd", 0.55),  # floor 0.60
        _attention_record("triton", attention.LONG, "fwd+bwd", 4.0),  # 240 TFLOP/s, floor 300
        _attention_record("triton", attention.VIT_L_LOCAL, "fwd", 0.05),  # goal 0.030, no floor
    ]
    records.append(_attention_record("triton", attention.LONG, "fwd", 0.5))
    records[-1]["check"] = "MISMATCH"
    path = _made_up_gpu_report(tmp_path, "attention", records)
    assert main(["report", str(path), "--headline"]) == 0
    lines = [line.replace("│", " ") for line in capsys.readouterr().out.splitlines()]

    def row(shape: attention.Shape, pass_: str, provider: str) -> str:
        return next(line for line in lines if line.split()[:3] == [shape.name, pass_, provider])

    assert "goal met" in row(attention.VIT_L_GLOBAL, "fwd+bwd", "triton")
    assert "verdict" not in row(attention.VIT_L_GLOBAL, "fwd+bwd", "sdpa-cudnn")
    assert "floor met" in row(attention.MULTI_CROP, "fwd+bwd", "triton")
    assert "below floor" in row(attention.LONG, "fwd+bwd", "triton")
    assert "below goal" in row(attention.VIT_L_LOCAL, "fwd", "triton")
    assert "MISMATCH" in row(attention.LONG, "fwd", "triton")


def _stochastic_depth_record(provider: str, op: str, pass_: str, stream: str, copy: float):
    workload = stochastic_depth.Workload(
        op,
        stochastic_depth.STEP,
        torch.float32 if stream == "fp32" else torch.bfloat16,
        torch.bfloat16,
    )
    nbytes = stochastic_depth.must_move_bytes(workload, pass_)
    gbps = copy * 3000.0
    return {
        "benchmark": "stochastic-depth",
        "provider": provider,
        "ours": provider in ("ours", "triton", "cuda"),
        "op": op,
        "pass": pass_,
        "shape": stochastic_depth.STEP.name,
        "groups": [list(group) for group in stochastic_depth.STEP.groups],
        "dim": stochastic_depth.STEP.dim,
        "dtype": "bf16",
        "stream_dtype": stream,
        "branch_dtype": "bf16",
        "status": "ok",
        "ms": 2 * nbytes / (gbps * 1e9) * 1e3,
        "graph_ms": nbytes / (gbps * 1e9) * 1e3,
        "bytes": nbytes,
        "GBps": gbps,
        "copy_fraction": copy,
        "baseline": "torch",
        "speedup": None,
        "max_rel_err": 0.0,
        "check": "ok",
        "note": "",
    }


def test_stochastic_depth_headline_holds_ours_against_the_copy_bandwidth(tmp_path, capsys):
    """From a made-up GPU report (not measured numbers)."""
    records = [
        _stochastic_depth_record("ours", "scaled_index_add", "fwd", "fp32", 0.85),
        _stochastic_depth_record("cuda", "scaled_index_add", "fwd", "fp32", 0.7),
        _stochastic_depth_record("xformers", "scaled_index_add", "fwd", "fp32", 0.425),
        _stochastic_depth_record("ours", "scaled_index_add", "fwd+bwd", "fp32", 0.5),
        _stochastic_depth_record("ours", "index_select_cat", "fwd", "bf16", 0.9),
    ]
    records[-1]["check"] = "MISMATCH"
    path = _made_up_gpu_report(tmp_path, "stochastic-depth", records)
    assert main(["report", str(path), "--headline"]) == 0
    lines = [line.replace("│", " ") for line in capsys.readouterr().out.splitlines()]

    def row(op: str, stream: str, pass_: str, provider: str = "ours") -> str:
        return next(line for line in lines if line.split()[:4] == [op, stream, pass_, provider])

    assert "goal met" in row("scaled_index_add", "fp32", "fwd")
    assert "2.00x" in row("scaled_index_add", "fp32", "fwd")  # vs xformers
    assert "below goal" in row("scaled_index_add", "fp32", "fwd", "cuda")  # each backend of ours
    assert "below goal" in row("scaled_index_add", "fp32", "fwd+bwd")
    assert "MISMATCH" in row("index_select_cat", "bf16", "fwd")


def _block_record(provider: str, shape: block.Shape, rate: float, ms: float, mib: float):
    return {
        "benchmark": "block",
        "provider": provider,
        "ours": provider == "ours",
        "pass": "fwd+bwd",
        "input": shape.input,
        "shape": shape.name,
        "groups": [list(group) for group in shape.groups],
        "dim": shape.dim,
        "dtype": "bf16",
        "drop_rate": rate,
        "drop_path": block.drop_path_kind(provider, shape, rate),
        "status": "ok",
        "ms": ms,
        "graph_ms": ms * 0.9,
        "peak_MiB": mib,
        "baseline": "torch",
        "speedup": None,
        "max_rel_err": 5e-3,
        "check": "ok",
        "note": "",
    }


def test_block_headline_holds_ours_against_the_ratio_target(tmp_path, capsys):
    """From a made-up GPU report (not measured numbers): ratios are computed from the records."""
    made_up = [
        ("ours", block.BATCH, 10.0, 1000.0, 6.5, 650.0),  # 0.65x, 0.65x: goal met
        ("torch", block.BATCH, 12.0, 1200.0, 12.5, 1250.0),
        ("torch.compile", block.BATCH, 9.0, 1100.0, 9.5, 1150.0),  # the stock best at p=0.4
        ("ours", block.MULTI_CROP, 18.0, 2000.0, 14.0, 1300.0),  # time 0.78x: below goal
        ("torch", block.MULTI_CROP, 20.0, 2200.0, 21.0, 2300.0),
    ]
    records = []
    for provider, shape, ms0, mib0, ms4, mib4 in made_up:
        records += [
            _block_record(provider, shape, 0.0, ms0, mib0),
            _block_record(provider, shape, 0.4, ms4, mib4),
        ]
    block._finish(records)  # the ratios and speedups, as the benchmark computes them
    path = _made_up_gpu_report(tmp_path, "block", records)
    assert main(["report", str(path), "--headline"]) == 0
    lines = [line.replace("│", " ") for line in capsys.readouterr().out.splitlines()]

    def row(kind: str, provider: str) -> str:
        return next(line for line in lines if line.split()[:2] == [kind, provider])

    assert "goal met" in row("batch", "ours") and "0.65x" in row("batch", "ours")
    assert "1.46x" in row("batch", "ours")  # the stock best (torch.compile) at p=0.4: 9.5 / 6.5
    assert "stock best" in row("batch", "torch.compile")
    assert not any(line.split()[:2] == ["batch", "torch"] for line in lines)
    assert "below goal (time 0.78x)" in row("multi-crop", "ours")


def test_attention_shapes_parse():
    assert attention.parse_shapes("64x257x16x64, packed") == [
        attention.VIT_L_GLOBAL,
        attention.MULTI_CROP,
    ]


def test_tables_fall_back_to_plain_text_without_rich(quick_report, capsys, monkeypatch):
    _, path = quick_report
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich...` now raises ImportError
    monkeypatch.setitem(sys.modules, "rich.console", None)
    assert main(["report", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("shape"))
    assert header.split()[:5] == ["shape", "pass", "provider", "dtypes", "ms"]
    assert not any("┃" in line for line in lines)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--dtype", "fp8"], "invalid choice"),
        (["bench", "attention-that-does-not-exist"], "unknown benchmark"),
        (["bench", "--shapes", "16448x"], "ROWSxD"),
        (["bench", "--shapes", "0x1024"], "ROWS >= 1"),
        (["bench", "attention", "--shapes", "64x257x16"], "BxNxHxD or the word packed"),
        (["bench", "attention", "--shapes", "64x257x0x64"], "H >= 1"),
        (["bench", "attention", "--shapes", "packd"], "BxNxHxD"),
        (["bench", "attention", "layernorm", "--shapes", "packed"], "ROWSxD"),
        (["bench", "attention", "--time-limit", "0"], "--time-limit must be a positive"),
        (["bench", "block", "--shapes", "64x257x1000"], "multiple of 64"),
        (["bench", "stochastic-depth", "--shapes", "64x257x1024+256x50x768"], "must share C"),
        (["bench", "stochastic-depth", "--shapes", "64x257"], "BxNxC"),
        (["bench", "--device", "tpu"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["report", "/no/such/report.json"], "cannot read a report"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.skipif(HAS_GPU, reason="checks the message on a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda"])
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bad_argument_from_the_command_line():
    done = _cli("bench", "--shapes", "big")
    assert done.returncode == 2
    assert "ROWSxD" in done.stderr


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out


def test_gpu_check_dry_run_runs_the_chosen_steps(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(script), "--dry-run"],
        env={**env, "GPU_CHECK_STEPS": "stochastic-depth"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok      bench stochastic-depth --quick (CPU)" in done.stdout
    assert "stochastic-depth: no numbers to hold against the targets" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.log",
        "stochastic-depth.json",
        "summary.txt",
    ]
    wrong = subprocess.run(
        ["bash", str(script), "--dry-run"],
        env={**env, "GPU_CHECK_STEPS": "tests blok"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert wrong.returncode == 2 and "unknown step in GPU_CHECK_STEPS: blok" in wrong.stderr


def test_gpu_check_dry_run_of_the_cuda_backend_s_steps(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(script), "--dry-run"],
        env={**env, "GPU_CHECK_STEPS": "cuda-tests sanitize tune"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped cuda-tests: needs a GPU (dry run)" in done.stdout
    assert "ok      sanitize: the kernels and cases it would check (no GPU)" in done.stdout
    assert "our kernels (csrc/*.cu): " in done.stdout and "layer_norm_fwd_kernel" in done.stdout
    assert "ok      bench tune --plan" in done.stdout
    assert "D=64,N<=320,dense,bf16" in (tmp_path / "tune.log").read_text()


def test_the_sanitizer_s_cases_run_on_the_emulated_cuda_kernels(emulated_cuda):
    """bench/sanitize_cuda.py's cases, on the CPU through tests/cuda_emulator: each op with a CUDA
    kernel forward and backward, against backend='torch' (what runs under compute-sanitizer)."""
    import importlib.util

    from dinov2_fast import _backend

    path = Path(__file__).resolve().parents[1] / "bench" / "sanitize_cuda.py"
    spec = importlib.util.spec_from_file_location("sanitize_cuda", path)
    sanitize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sanitize)
    assert "layer_norm_fwd_kernel" in sanitize.kernel_names()
    ran = 0
    for op, description, run in sanitize.cases("cpu"):
        if "cuda" not in _backend.AUTO_PREFERENCE[op]:
            continue
        assert sanitize._compare(run("cuda"), run("torch")) == "", f"{op} {description}"
        ran += 1
    assert ran >= 22  # LayerNorm and attention at least
