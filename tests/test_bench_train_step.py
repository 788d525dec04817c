"""`dinov2-fast bench train-step`: the CLI on the CPU (--quick, --json, --plot), the options, the
synthetic batch, a non-finite loss, the headline and the plot from made-up GPU reports, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import _made_up_gpu_report

from dinov2_fast import benchmark
from dinov2_fast.benchmark import train_step as bench
from dinov2_fast.benchmark.timing import Timer
from dinov2_fast.cli import main

pytest.importorskip("yaml")  # the trainer's configs (the train extra)

PROVIDER = {provider.name: provider for provider in bench.PROVIDERS}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """One `bench train-step --quick --device cpu --json PATH --plot PNG` run, shared below."""
    folder = tmp_path_factory.mktemp("bench")
    path, png = folder / "train-step.json", folder / "plots" / "train-step.png"
    done = subprocess.run(
        [sys.executable, "-m", "dinov2_fast.cli", "bench", "train-step", "--quick"]
        + ["--device", "cpu", "--json", str(path), "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return done, path, png


def test_cli_quick_on_cpu_times_fast_and_baseline_and_draws_them(quick_report, capsys):
    done, path, png = quick_report
    assert done.returncode == 0, done.stderr
    assert "DINOv2 training step" in done.stdout and "not meaningful" in done.stdout
    assert f"wrote {png}" in done.stdout
    report = json.loads(path.read_text())
    assert report["device_type"] == "cpu" and report["benchmarks"] == ["train-step"]
    assert any("synthetic data" in note and "no data loading" in note for note in report["notes"])
    results = report["results"]
    config = bench.Options().resolve(quick=True, on_gpu=False)
    assert [r["provider"] for r in results] == [p.name for p in bench.PROVIDERS]
    for row in results:
        assert row["benchmark"] == "train-step" and row["shape"] == config.name
        assert (row["preset"], row["batch"], row["img_size"]) == ("demo", 4, 32)
        assert (row["local_crops"], row["local_size"], row["dtype"]) == (4, 16, "fp32")
        assert row["ours"] == (row["impl"] == "fast") and row["baseline"] == "baseline"
        if row["compiled"]:  # torch.compile on the CPU only with --compile
            assert row["status"] == "skipped" and "slow to compile" in row["note"]
            continue
        if PROVIDER[row["provider"]].gpu_kernel:  # fast/triton, fast/cuda: GPU kernels only
            assert row["status"] == "not timed" and "no CUDA GPU" in row["note"], row
            continue
        assert row["status"] == "ok" and row["check"] == "ok", row
        assert row["steps"] == bench.SMALL_STEPS and row["ms_min"] <= row["ms"] <= row["ms_max"]
        assert row["images_per_s"] == pytest.approx(4 / (row["ms"] * 1e-3))
        assert math.isfinite(row["loss"]) and row["loss"] == row["losses"]["total_loss"]
        assert {"dino_global_crops_loss", "ibot_loss", "koleo_loss"} <= set(row["losses"])
        assert row["params_MiB"] > 0 and row["optimizer_MiB"] > 0 and row["first_call_s"] > 0
        assert row["peak_MiB"] is None and row["resident_MiB"] is None  # CUDA only
        assert row["speedup"] > 0 and row["memory_ratio"] is None
    by_name = {r["provider"]: r for r in results}
    assert by_name["baseline"]["speedup"] == pytest.approx(1.0)
    # The same model in both implementations: the same parameters, the same AdamW state.
    assert by_name["fast"]["params_MiB"] == pytest.approx(by_name["baseline"]["params_MiB"])
    assert by_name["fast"]["optimizer_MiB"] == pytest.approx(by_name["baseline"]["optimizer_MiB"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["report", str(path)]) == 0
    assert "DINOv2 training step" in capsys.readouterr().out
    assert main(["report", str(path), "--headline"]) == 0
    assert "train-step: no numbers to hold against the targets (not a GPU run)" in (
        capsys.readouterr().out
    )


# --- configurations and the batch ----------------------------------------------------------------


def test_options_resolve_to_the_presets():
    gpu = bench.Options().resolve(quick=False, on_gpu=True)
    assert (gpu.preset, gpu.arch, gpu.batch, gpu.img_size, gpu.patch_size) == (
        "vitl14",
        "vit_large",
        32,
        224,
        14,
    )
    assert (gpu.local_crops, gpu.local_size, gpu.drop_path) == (8, 98, 0.4)
    assert (gpu.warmup, gpu.steps) == (bench.GPU_WARMUP, bench.GPU_STEPS)
    assert gpu.name == "vitl14 batch 32: 2x224 + 8x98 px" and gpu.label == "ViT-L/14"
    cpu = bench.Options().resolve(quick=False, on_gpu=False)
    assert (cpu.preset, cpu.arch, cpu.batch, cpu.img_size, cpu.patch_size) == (
        "demo",
        None,
        4,
        32,
        4,
    )
    assert (cpu.warmup, cpu.steps) == (bench.SMALL_WARMUP, bench.SMALL_STEPS)
    assert bench.Options().resolve(quick=True, on_gpu=True) == cpu
    given = bench.Options("vit_base", 8, 112, 0.0).resolve(quick=True, on_gpu=False)
    assert (given.preset, given.batch, given.img_size, given.drop_path) == ("vitb14", 8, 112, 0.0)
    assert bench.Options("vit_giant2").resolve(quick=False, on_gpu=True).preset == "vitg14"
    with pytest.raises(ValueError, match="multiple of the patch size 4 of the demo preset"):
        bench.Options(img_size=30).resolve(quick=True, on_gpu=False)
    assert not bench.Options().given() and bench.Options(batch=4).given()


def test_training_config_sets_the_provider_s_implementation():
    config = bench.Options().resolve(quick=True, on_gpu=False)
    stock = bench.training_config(config, PROVIDER["stock+compile"])
    assert (stock.compute.impl, stock.compute.compile, stock.compute.precision) == (
        "stock",
        True,
        "bf16",
    )
    fast = bench.training_config(config, PROVIDER["fast"])
    assert (fast.compute.impl, fast.compute.compile, fast.compute.backend) == (
        "fast",
        False,
        "auto",
    )
    assert fast.train.batch_size_per_gpu == 4 and fast.crops.global_crops_size == 32
    assert fast.student.drop_path_rate == 0.1 and fast.train.num_workers == 0
    for backend in ("triton", "cuda"):  # the fast implementation once per kernel backend
        named = bench.training_config(config, PROVIDER[f"fast/{backend}"])
        assert (named.compute.impl, named.compute.backend) == ("fast", backend)


def test_a_kernel_backend_without_every_backbone_kernel_is_skipped(monkeypatch):
    from dinov2_fast import _backend

    monkeypatch.setattr(_backend, "unavailable_reason", lambda backend, device: "")
    cuda = torch.device("cuda")
    preference = {**_backend.AUTO_PREFERENCE, "index_select_cat": ("triton", "torch")}
    monkeypatch.setattr(_backend, "AUTO_PREFERENCE", preference)
    status = bench.provider_status(PROVIDER["fast/cuda"], cuda, torch.bfloat16)
    assert status == ("skipped", "no cuda kernel yet for index_select_cat")
    assert bench.provider_status(PROVIDER["fast/triton"], cuda, torch.bfloat16) == ("ok", "")
    cpu = bench.provider_status(PROVIDER["fast/cuda"], torch.device("cpu"), torch.bfloat16)
    assert cpu[0] == "not timed"


def test_the_synthetic_batch_has_the_trainer_s_shapes_and_is_seeded():
    config = bench.Options(batch=3).resolve(quick=True, on_gpu=False)
    batch = bench.make_batch(config, torch.device("cpu"))
    assert batch["collated_global_crops"].shape == (6, 3, 32, 32)
    assert batch["collated_local_crops"].shape == (12, 3, 16, 16)
    masks = batch["collated_masks"]
    assert masks.shape == (6, 64) and masks.dtype == torch.bool
    assert masks.any(1).sum() == 3  # mask_sample_probability 0.5 of the 6 global crops
    assert batch["n_masked_patches"].item() == masks.sum() == len(batch["mask_indices_list"])
    again = bench.make_batch(config, torch.device("cpu"))
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again[key]), key


def _cpu_context() -> benchmark.BenchContext:
    """A --quick run on the CPU, without the copy bandwidth that `benchmark.run` measures."""
    cpu = torch.device("cpu")
    return benchmark.BenchContext(cpu, torch.bfloat16, True, Timer.for_device(cpu, quick=True), 1.0)


def test_without_drop_path_fast_and_baseline_start_from_the_same_losses():
    """The same weights and the same batch for every provider: at drop path 0 the two
    implementations compute the same first step (fp32 on the CPU)."""
    records, _ = bench.run(_cpu_context(), [bench.Options(drop_path=0.0)])
    rows = {r["provider"]: r for r in records if r["status"] == "ok"}
    assert set(rows) == {"fast", "baseline"} and rows["fast"]["drop_rate"] == 0.0
    assert set(rows["fast"]["losses"]) == set(rows["baseline"]["losses"])
    for name, value in rows["baseline"]["losses"].items():
        assert rows["fast"]["losses"][name] == pytest.approx(value, rel=1e-5), name


def test_a_non_finite_loss_fails_the_row(monkeypatch, tmp_path, capsys):
    from dinov2_fast.train import trainer

    real = trainer.training_step

    def nan_ibot(training, batch, step):
        losses = real(training, batch, step)
        return {**losses, "ibot_loss": torch.tensor(float("nan"))}

    monkeypatch.setattr(trainer, "training_step", nan_ibot)
    records, _ = bench.run(_cpu_context())
    timed = [r for r in records if not r["compiled"] and r["status"] != "not timed"]
    assert [r["provider"] for r in timed] == ["fast", "baseline"]
    for row in timed:
        assert row["status"] == "error", row
        assert row["note"].startswith("FAILED: non-finite loss") and "ibot_loss=nan" in row["note"]
    path = _made_up_gpu_report(tmp_path, "train-step", records)
    assert main(["report", str(path), "--headline"]) == 0
    fast = _row([line.replace("│", " ") for line in capsys.readouterr().out.splitlines()], "fast")
    assert "FAILED: non-finite loss" in fast and "FAILED: FAILED" not in fast


# --- the headline and the plot, from made-up GPU reports (not measured numbers) -------------------


def _made_up(provider: str, ms: float, mib: float, **fields) -> dict:
    config = bench.Options().resolve(quick=False, on_gpu=True)
    return bench._record(
        PROVIDER[provider],
        config,
        bench.PASS,
        "ok",
        torch.bfloat16,
        ms=ms,
        images_per_s=config.batch / (ms * 1e-3),
        peak_MiB=mib,
        resident_MiB=mib / 4,
        steps=10,
        check="ok",
        **fields,
    )


def _headline_lines(tmp_path: Path, records: list[dict], capsys) -> list[str]:
    bench._finish(records)  # the order and the ratios, as the benchmark computes them
    path = _made_up_gpu_report(tmp_path, "train-step", records)
    assert main(["report", str(path), "--headline"]) == 0
    return [line.replace("│", " ") for line in capsys.readouterr().out.splitlines()]


def _row(lines: list[str], provider: str) -> str:
    return next(line for line in lines if line.split()[:1] == [provider])


def test_headline_says_targets_met(tmp_path, capsys):
    records = [
        _made_up("stock+compile", 165.0, 30000.0),
        _made_up("fast", 130.0, 13000.0),
        _made_up("baseline", 284.0, 42000.0),
    ]
    lines = _headline_lines(tmp_path, records, capsys)
    assert [r["provider"] for r in records] == ["fast", "baseline", "stock+compile"]
    fast = _row(lines, "fast")
    assert "targets met" in fast and "2.18x" in fast and "0.31x" in fast and "1.27x" in fast
    assert "246.2" in fast and "12.70" in fast  # images/s, peak GiB
    assert "met" not in _row(lines, "baseline") and "1.00x" in _row(lines, "baseline")
    assert "ViT-L/14 (vitl14 preset), 32 images a step" in "\n".join(lines)
    assert "configuration differs" not in "\n".join(lines)


def test_headline_says_what_was_missed(tmp_path, capsys):
    records = [
        _made_up("fast", 160.0, 20000.0),
        _made_up("baseline", 284.0, 42000.0),
        _made_up("stock+compile", 165.0, 30000.0),
        _made_up("fast+compile", 140.0, 13000.0),
    ]
    lines = _headline_lines(tmp_path, records, capsys)
    fast = _row(lines, "fast")
    assert "missed: speed 1.77x < 2x; memory 0.48x > 1/3; vs stock+compile 1.03x < 1.2x" in fast
    compiled = _row(lines, "fast+compile")
    assert "missed: vs stock+compile 1.18x < 1.2x" in compiled and "speed" not in compiled


def test_headline_without_stock_compile_or_baseline(tmp_path, capsys):
    config = bench.Options().resolve(quick=False, on_gpu=True)
    skipped = bench._record(
        PROVIDER["stock+compile"], config, bench.PASS, "skipped", torch.bfloat16, note="out of time"
    )
    records = [_made_up("fast", 130.0, 13000.0), _made_up("baseline", 284.0, 42000.0), skipped]
    lines = _headline_lines(tmp_path, records, capsys)
    assert "baseline targets met; stock+compile not timed" in _row(lines, "fast")
    alone = [_made_up("fast", 130.0, 13000.0)]
    lines = _headline_lines(tmp_path, alone, capsys)
    assert "no verdict: baseline not timed" in _row(lines, "fast")
    assert bench.headline([_made_up("baseline", 284.0, 42000.0)]) is None


def test_headline_notes_a_configuration_off_the_targets():
    config = bench.Options(arch="vit_base").resolve(quick=False, on_gpu=True)
    records = [
        bench._record(PROVIDER[name], config, bench.PASS, "ok", torch.bfloat16, ms=ms, peak_MiB=m)
        for name, ms, m in (("fast", 50.0, 5000.0), ("baseline", 120.0, 16000.0))
    ]
    bench._finish(records)
    result = bench.headline(records)
    assert result is not None and any("configuration differs" in n for n in result.notes)


def test_plot_of_a_gpu_report_draws_both_panels(tmp_path):
    pytest.importorskip("matplotlib")
    records = [
        _made_up("fast", 130.0, 13000.0),
        _made_up("baseline", 284.0, 42000.0),
        _made_up("stock+compile", 165.0, 30000.0),
    ]
    bench._finish(records)
    report = json.loads(_made_up_gpu_report(tmp_path, "train-step", records).read_text())
    svg = bench.plot(report, str(tmp_path / "chart.svg")).read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for words in ("images / s", "peak GiB", "2x baseline", "1.2x stock+compile", "1/3 of baseline"):
        assert words in svg
    assert bench.plot(report, str(tmp_path / "chart.pdf")).read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError, match="nothing to plot"):
        bench.plot({**report, "results": []}, str(tmp_path / "empty.png"))


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "train-step", "--batch", "1"], "--batch must be at least 2 for train-step"),
        (["bench", "train-step", "--arch", "vit_large", "--img-size", "225"], "patch size 14"),
        (
            ["bench", "train-step", "--device", "cpu", "--img-size", "30"],
            "patch size 4 of the demo",
        ),
        (["bench", "train-step", "--drop-path", "1"], "--drop-path must be in [0, 1)"),
        (["bench", "train-step", "--arch", "vit_huge"], "invalid choice"),
        (["bench", "train-step", "--source", "timm"], "--source configures the model benchmark"),
        (["bench", "train-step", "--shapes", "32x224"], "not --shapes"),
        (["bench", "train-step", "--plot", "chart.jpg"], "must end in .png, .pdf, .svg"),
        (["bench", "layernorm", "--plot", "chart.png"], "--plot draws the train-step benchmark"),
        (["bench", "layernorm", "--batch", "4"], "configure the model benchmark only"),
    ],
)
def test_bad_options_exit_with_a_message(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit):
        main(["bench", "train-step", "--plot", "chart.png"])
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


# --- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_quick_run_measures_peak_and_resident_memory():
    device = torch.device("cuda", torch.cuda.current_device())
    context = benchmark.BenchContext(
        device, torch.bfloat16, True, Timer.for_device(device, quick=True), 1000.0
    )
    records, _ = bench.run(context)
    timed = [r for r in records if r["status"] == "ok"]
    assert {r["provider"] for r in timed} >= {"fast", "fast/triton", "baseline"}
    named = {r["provider"]: r for r in records}["fast/cuda"]  # timed, or skipped saying why
    assert named["status"] == "ok" or (named["status"] == "skipped" and named["note"]), named
    for record in timed:
        assert record["dtype"] == "bf16" and record["check"] == "ok", record
        assert record["peak_MiB"] > record["resident_MiB"] > 0
        assert record["memory_ratio"] > 0
