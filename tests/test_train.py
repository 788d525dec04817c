"""The trainer end to end on the CPU: configs, the demo preset for a few steps, fast against
baseline (the same losses with drop path 0), an exact resume, a non-finite loss, the CLI, k-NN
evaluation, and two processes under torchrun with FSDP."""

from __future__ import annotations

import json
import math

import pytest
import torch
from distributed import TESTS, torchrun

from dinov2_fast.cli import main
from dinov2_fast.train import trainer as trainer_module
from dinov2_fast.train.config import PRESETS, apply_overrides, load_config, save_config
from dinov2_fast.train.trainer import NonFiniteLossError, train

# A tiny model on 16 px digits: 4x4 patches of 4 px, 2 local crops of 8 px; a few steps in seconds.
TINY = [
    "student.embed_dim=64",
    "student.depth=2",
    "student.num_heads=2",
    "train.batch_size_per_gpu=4",
    "train.num_workers=0",
    "train.log_every=1",
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
    "evaluation.knn_at_end=false",
]


def _config(*overrides: str):
    return load_config("demo", [*TINY, *overrides])


def _metrics(output_dir) -> list[dict]:
    lines = (output_dir / "training_metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# --- configs --------------------------------------------------------------------------------------


def test_cuda_backend_in_fp32_is_refused_before_building():
    cfg = _config("compute.backend=cuda", "compute.precision=fp32")
    with pytest.raises(ValueError, match="compute.backend=cuda needs compute.precision bf16"):
        trainer_module.build_training(cfg, torch.device("cpu"))


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_with_dinov2s_keys(preset):
    cfg = load_config(preset)
    assert cfg.optim.clip_grad == 3.0 and cfg.ibot.mask_ratio_min_max == [0.1, 0.5]
    if preset == "vitl14":  # DINOv2's vitl14.yaml
        assert cfg.student.ffn_layer == "swiglufused" and cfg.student.block_chunks == 4
        assert cfg.train.centering == "sinkhorn_knopp" and cfg.dino.head_n_prototypes == 131072
        assert cfg.optim.base_lr == 2.0e-4 and cfg.teacher.momentum_teacher == 0.994


def test_overrides_parse_yaml_values_and_reject_unknown_keys(tmp_path):
    cfg = load_config("demo", ["optim.base_lr=1e-3", "crops.global_crops_scale=[0.3, 1.0]"])
    assert cfg.optim.base_lr == 1e-3 and cfg.crops.global_crops_scale == [0.3, 1.0]
    with pytest.raises(KeyError, match="did you mean optim.base_lr"):
        apply_overrides(cfg, ["optim.base_lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["optim.base_lr"])
    with pytest.raises(ValueError, match="is a section"):
        apply_overrides(cfg, ["optim=3"])
    with pytest.raises(ValueError, match="config must be one of"):
        load_config("vitx14")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg  # the resolved config reads back as a config file


# --- training -------------------------------------------------------------------------------------


def test_demo_preset_trains_a_few_steps(tmp_path):
    cfg = _config("evaluation.knn_at_end=true")
    summary = train(cfg, output_dir=tmp_path, max_steps=3, progress=False)
    assert summary.steps == 3 and math.isfinite(summary.final_loss)
    assert 0 <= summary.knn_before <= 100 and 0 <= summary.knn_after <= 100
    assert any("k-NN accuracy" in line for line in summary.lines())
    assert summary.memory_kind == "RSS" and summary.peak_memory_MiB > 0
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"} <= set(
        records[0]
    )
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "summary.json").is_file()
    assert (tmp_path / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_fast_and_baseline_give_the_same_losses_without_drop_path(tmp_path, centering):
    """Same method, same data and weights: the packed, fused path and the iBOT-style one agree."""
    common = ["student.drop_path_rate=0.0", f"train.centering={centering}"]
    runs = {}
    for impl, backend in (("fast", "triton"), ("baseline", "auto")):
        cfg = _config(*common, f"compute.impl={impl}", f"compute.backend={backend}")
        train(cfg, output_dir=tmp_path / impl, max_steps=3, progress=False)
        runs[impl] = _metrics(tmp_path / impl)
    for fast, base in zip(runs["fast"], runs["baseline"]):
        for name in ("total_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss"):
            assert fast[name] == pytest.approx(base[name], rel=2e-4, abs=1e-5), (fast["step"], name)


def test_fast_on_the_cuda_kernels_trains_like_the_torch_reference(tmp_path, emulated_cuda):
    """Every backbone op of the fast path on the CUDA kernels (emulated on the CPU, under bf16
    autocast: packed multi-crop attention, LayerNorm, the stochastic-depth gather and update)
    gives the losses of the torch backend, to bf16 rounding."""
    runs = {}
    for backend in ("cuda", "torch"):
        cfg = _config(
            "student.drop_path_rate=0.3", "compute.precision=bf16", f"compute.backend={backend}"
        )
        train(cfg, output_dir=tmp_path / backend, max_steps=3, progress=False)
        runs[backend] = _metrics(tmp_path / backend)
    for cuda, reference in zip(runs["cuda"], runs["torch"]):
        for name in ("total_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss"):
            assert cuda[name] == pytest.approx(reference[name], rel=2e-2, abs=1e-3), (
                cuda["step"],
                name,
            )


def test_resume_continues_exactly(tmp_path):
    cfg = _config("student.drop_path_rate=0.3", "train.checkpoint_every=2")
    train(cfg, output_dir=tmp_path / "whole", max_steps=4, progress=False)
    train(cfg, output_dir=tmp_path / "split", max_steps=2, progress=False)
    train(cfg, output_dir=tmp_path / "split", max_steps=4, resume=True, progress=False)
    whole, split = _metrics(tmp_path / "whole"), _metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(whole, split):
        assert a["total_loss"] == pytest.approx(b["total_loss"], rel=1e-6), a["step"]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = _config("train.checkpoint_every=1")
    real_step = trainer_module.training_step

    def step(training, batch, index):
        if index == 2:
            original = training.model.forward_backward

            def poisoned(*args, **kwargs):
                losses = original(*args, **kwargs)
                return {**losses, "total_loss": losses["total_loss"] * float("nan")}

            training.model.forward_backward = poisoned
        return real_step(training, batch, index)

    monkeypatch.setattr(trainer_module, "training_step", step)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 2"):
        train(cfg, output_dir=tmp_path, max_steps=5, progress=False)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip().endswith("step_00000002")


# --- the command line -----------------------------------------------------------------------------


def test_cli_train_and_eval_knn(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "demo", "--output-dir", str(out), "--max-steps", "2"]
    assert main([*args, "--no-progress", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "RSS" in printed
    assert main(["eval", "knn", "--checkpoint", str(out), "--k", "5"]) == 0
    assert "k-NN top-1 accuracy (k=5)" in capsys.readouterr().out


def test_readme_main_command_runs_the_demo_preset(tmp_path, capsys):
    """`dinov2-fast train --config demo`, cut to 2 steps: the preset as shipped (its workers, the
    bundled digits, the k-NN report at the end)."""
    args = ["train", "--config", "demo", "--output-dir", str(tmp_path), "--max-steps", "2"]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "k-NN accuracy of the teacher" in printed and "before training" in printed
    assert json.loads((tmp_path / "summary.json").read_text())["impl"] == "fast"


def test_cli_impl_option_runs_the_baseline(tmp_path):
    args = ["train", "--impl", "baseline", "--output-dir", str(tmp_path), "--max-steps", "1"]
    assert main([*args, "--no-progress", *TINY]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["impl"] == "baseline"


def test_cli_errors_are_clear(tmp_path, capsys):
    run = ["train", "--output-dir", str(tmp_path), "--no-progress"]
    assert main([*run, "--data", str(tmp_path / "nowhere"), *TINY]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main([*run, "optim.base_lrr=1"]) == 2
    assert "did you mean optim.base_lr" in capsys.readouterr().err
    assert main([*run, "--config", "vitl14"]) == 2  # no data given for a real preset
    assert "--data DIR" in capsys.readouterr().err
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "none")]) == 2


# --- two processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_sharded_and_resume(tmp_path):
    """torchrun with 2 gloo processes: the student and teacher sharded with FSDP2, a checkpoint,
    and a resume on the same world size."""
    cli = str(TESTS.parent / "dinov2_fast" / "cli.py")
    common = ["train", "--no-progress", "--output-dir", str(tmp_path), *TINY]
    first = torchrun(cli, 2, *common, "--max-steps", "2", "train.checkpoint_every=2")
    torchrun(cli, 2, *common, "--max-steps", "3", "--resume")
    assert "returned a view tensor" not in first.stderr  # FSDP2's warning, filtered by the trainer
    steps = [r["step"] for r in _metrics(tmp_path)]
    assert steps == [1, 2, 3]
    assert all(math.isfinite(r["total_loss"]) for r in _metrics(tmp_path))


def test_eval_knn_gives_high_accuracy_on_separable_features():
    """The evaluation path itself: an identity 'backbone' of flattened pixels separates digits."""
    from dinov2_fast.train.evaluate import evaluate_knn_digits

    class Pixels(torch.nn.Module):
        def forward(self, images):
            return images.flatten(1)

    accuracy = evaluate_knn_digits(Pixels(), image_size=16, k=5)
    assert accuracy > 85.0
