"""`dinov2-fast bench tune`: the plan of measurements, one measurement on the CPU (the check
against the torch backend, the records), the table a run writes (with the GPU faked and made-up
times), its summary, and the command line: refused without a GPU, --plan, bad options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dinov2_fast import _backend, backend_table
from dinov2_fast.benchmark import tune
from dinov2_fast.benchmark.timing import Timer
from dinov2_fast.cli import main


@pytest.fixture(autouse=True)
def isolated_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(backend_table.ENV_TABLE, raising=False)
    backend_table.reload()
    yield
    backend_table.reload()


def test_the_plan_covers_every_class_of_dinov2_s_sizes_most_used_first():
    plan = tune.plan()
    classes = {(m.op, m.shape_class) for m in plan}
    assert len({(m.op, m.shape_class, m.shape) for m in plan}) == len(plan)  # nothing twice
    for dtype in ("bf16", "fp16"):
        for head_dim in (64, 128):
            for bucket in ("N<=320", "N<=1400", "N>1400"):
                for layout in ("dense", "packed"):
                    assert ("attention", f"D={head_dim},{bucket},{layout},{dtype}") in classes
        for width in ("C<=512", "C<=1024", "C>1024"):
            for rows in ("rows<=8192", "rows>8192"):
                where = f"{width},{rows}"
                for types in (dtype, f"fp32->{dtype}"):
                    assert ("layer_norm", f"{where},{types}") in classes
                    assert ("index_select_layer_norm", f"{where},{types}") in classes
                for types in (dtype, f"fp32+{dtype}"):
                    assert ("scaled_index_add", f"{where},{types}") in classes
                for types in (dtype, "fp32"):
                    assert ("index_select_cat", f"{where},{types}") in classes
    # ViT-L's crops at head dim 64 in bf16 first; fp16 after every bf16 class.
    assert plan[0].shape == "64x257x16x64" and plan[0].shape_class == "D=64,N<=320,dense,bf16"
    last_bf16 = max(i for i, m in enumerate(plan) if m.shape_class.endswith("bf16"))
    first_fp16 = min(i for i, m in enumerate(plan) if "fp16" in m.shape_class)
    assert last_bf16 < first_fp16
    # The shape class each measurement is filed under is the one the op computes for its shape.
    quick = tune.plan(["bf16"], quick=True)
    assert len(quick) == 10 and {m.op for m in quick} == set(backend_table.OPS)


@pytest.mark.parametrize("measurement", tune.plan(["bf16"], quick=True), ids=lambda m: m.op)
def test_each_measurement_s_op_resolves_with_the_class_it_is_filed_under(measurement, monkeypatch):
    seen = []
    real = _backend.resolve

    def spy(op, backend, device, shape_class=None):
        seen.append((op, shape_class))
        return real(op, backend, device, shape_class)

    monkeypatch.setattr(_backend, "resolve", spy)
    built = measurement.build("torch", torch.device("cpu"))
    out = built.forward()
    grads = built.fwd_bwd()
    assert out.isfinite().all() and all(g.isfinite().all() for g in grads)
    assert seen and set(seen) == {(measurement.op, measurement.shape_class)}


def _cpu_timer() -> Timer:
    return Timer.for_device(torch.device("cpu"), quick=True)


def test_a_measurement_times_each_backend_and_rejects_a_wrong_one(monkeypatch):
    measurement = tune.plan(["bf16"], quick=True)[2]  # layer_norm, bf16
    assert measurement.op == "layer_norm"
    real_build = measurement.build

    def build(backend, device):  # "triton" here stands for a kernel that computes nonsense
        built = real_build("torch", device)
        if backend == "triton":
            return tune.Built(lambda: built.forward() * 2, built.fwd_bwd)
        return built

    monkeypatch.setattr(tune, "backends_here", lambda op, device: ["triton", "torch"])
    wrong = tune.Measurement(measurement.op, measurement.shape_class, measurement.shape, build)
    record = tune.measure(wrong, torch.device("cpu"), _cpu_timer())
    assert record["shape"] == measurement.shape and record["pass"] == "fwd+bwd"
    assert list(record["eager_ms"]) == ["torch"] and record["eager_ms"]["torch"] > 0
    assert record["graph_ms"] == {}  # CUDA graphs need a GPU: eager time only, and it says so
    assert record["rejected"]["triton"].startswith("max |out - torch| / max |torch| = ")
    assert "CUDA graphs need a CUDA device" in record["rejected"]["torch"]


def test_a_broken_backend_is_rejected_with_its_error_and_the_others_still_run(monkeypatch):
    measurement = tune.plan(["bf16"], quick=True)[2]

    def build(backend, device):
        if backend == "cuda":
            raise RuntimeError("launch failed\nsecond line")
        return measurement.build(backend, device)

    monkeypatch.setattr(tune, "backends_here", lambda op, device: ["cuda", "torch"])
    broken = tune.Measurement(measurement.op, measurement.shape_class, measurement.shape, build)
    record = tune.measure(broken, torch.device("cpu"), _cpu_timer())
    assert record["rejected"]["cuda"] == "RuntimeError: launch failed"
    assert list(record["eager_ms"]) == ["torch"]


@pytest.fixture
def fake_h100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return torch.device("cuda", 0)


def _made_up_measure(measurement, device, timer):
    """Made-up times (not measured): cuda fastest for attention, triton for the others."""
    fastest = "cuda" if measurement.op == "attention" else "triton"
    graph = {"triton": 0.2, "cuda": 0.3, "torch": 0.5}
    graph[fastest] = 0.1
    return {"shape": measurement.shape, "pass": "fwd+bwd", "graph_ms": graph, "eager_ms": graph}


def test_a_run_writes_a_table_that_auto_reads(tmp_path, monkeypatch, fake_h100):
    monkeypatch.setattr(tune, "measure", _made_up_measure)
    plan = tune.plan(["bf16"], quick=True)
    table = tune.run(fake_h100, dtypes=["bf16"], measurements=plan, timer=_cpu_timer())
    assert table["device"] == "NVIDIA H100 80GB HBM3" and table["compute_capability"] == "9.0"
    assert table["source"] == "dinov2-fast bench tune" and table["not_measured"] == []
    assert table["torch"] == torch.__version__ and table["dtypes"] == ["bf16"]
    assert sum(len(records) for c in table["ops"].values() for records in c.values()) == len(plan)
    path = backend_table.write(table, backend_table.user_table_path(table["device"]))
    backend_table.reload()
    assert backend_table.load(path).data == json.loads(json.dumps(table))
    everything = ("triton", "cuda", "torch")
    for measurement in plan:
        expected = "cuda" if measurement.op == "attention" else "triton"
        chosen = backend_table.choose(
            measurement.op, measurement.shape_class, everything, "NVIDIA H100 80GB HBM3", "9.0"
        )
        assert chosen == expected, measurement
    summary = tune.summary_table(table)
    assert len(summary.rows) == len({(m.op, m.shape_class) for m in plan})
    first = summary.rows[0]
    assert first[:2] == ["attention", "D=64,N<=320,dense,bf16"] and first[5] == "cuda"
    assert first[3] == "triton 0.2000, cuda 0.1000, torch 0.5000"


def test_a_run_out_of_time_lists_what_it_left_out(monkeypatch, fake_h100):
    monkeypatch.setattr(tune, "measure", _made_up_measure)
    plan = tune.plan(["bf16"], quick=True)
    table = tune.run(fake_h100, measurements=plan, time_limit_s=1e-9, timer=_cpu_timer())
    assert table["ops"] == {} and len(table["not_measured"]) == len(plan)
    assert all(item["why"] == tune.OUT_OF_TIME for item in table["not_measured"])
    backend_table.validate(table)
    notes = tune.summary_table(table).notes
    assert notes[0].startswith("not measured: attention D=64,N<=320,dense,bf16 (out of time")


def test_a_run_needs_a_cuda_device():
    with pytest.raises(ValueError, match="device must be CUDA, got cpu"):
        tune.run(torch.device("cpu"))


# --- the command line ----------------------------------------------------------------------------


def test_the_plan_prints_without_a_gpu(capsys):
    assert main(["bench", "tune", "--plan", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "D=64,N<=320,packed,bf16" in out and "packed(64x257+256x37)x16x64" in out
    assert "fp16" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_tune_without_a_gpu_refuses_and_writes_nothing(tmp_path):
    out = tmp_path / "table.json"
    done = subprocess.run(
        [sys.executable, "-m", "dinov2_fast.cli", "bench", "tune", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "bench tune needs a CUDA GPU" in done.stderr and "nothing was written" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "tune", "attention"], "bench tune runs alone"),
        (["bench", "tune", "--shapes", "64x257x16x64"], "not --shapes"),
        (["bench", "tune", "--json", "x.json"], "not --json"),
        (["bench", "tune", "--arch", "vit_large"], "not --arch"),
        (["bench", "tune", "--out", "a.json", "--ship"], "not allowed with argument --out"),
        (["bench", "tune", "--time-limit", "0"], "--time-limit must be a positive"),
        (["bench", "attention", "--out", "a.json"], "options of `dinov2-fast bench tune`"),
        (["bench", "layernorm", "--plan"], "options of `dinov2-fast bench tune`"),
    ],
)
def test_bad_tune_arguments_exit_nonzero_with_a_message(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err
