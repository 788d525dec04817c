"""The `dinov2-fast` command: info, bench (--quick runs on the CPU) and report, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2_fast import benchmark
from dinov2_fast.benchmark import attention
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
    for name in ("triton", "triton-memeff", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient"):
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
