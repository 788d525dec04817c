"""dinov2_fast.fsdp.checkpoint: atomic DCP save, resume on another world size, export to hub keys.

The distributed part runs once (tests/fsdp_checkpoint_worker.py on 2 ranks, gloo, CPU): a sharded
teacher/student run saves, fails two saves, resumes and exports; the tests here check its results
and resume the same checkpoint in this process, unsharded and without a process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from dinov2_reference import RefDinoVisionTransformer
from distributed import TESTS, torchrun
from fsdp_checkpoint_worker import (
    CONFIG,
    SAVE_AT,
    TOTAL,
    build,
    full_optimizer_state,
    run,
)
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter

from dinov2_fast import models
from dinov2_fast.fsdp import checkpoint
from dinov2_fast.fsdp.checkpoint import (
    export_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _assert_states_equal(actual: dict, expected: dict, rtol: float = 0.0, atol: float = 0.0):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(actual[key], value, rtol=rtol, atol=atol, msg=key)
        else:
            assert actual[key] == value, key


def _entries(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _steps(directory) -> list[str]:
    return [name for name in _entries(directory) if name.startswith("step_")]


# -- two ranks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Run the worker on 2 ranks once: (output directory, rank 0's results)."""
    out = tmp_path_factory.mktemp("sharded_run")
    torchrun("fsdp_checkpoint_worker.py", 2, str(out), timeout=300)
    return out, torch.load(out / "result.pt", weights_only=False)


def test_resume_on_two_ranks_continues_exactly(sharded_run):
    _, result = sharded_run
    assert result["world"] == 2
    assert result["loaded"] == {
        "step": SAVE_AT,
        "extra": {"images_seen": SAVE_AT * 4},
        "path": f"step_{SAVE_AT:08d}",
    }
    # The optimizer state (AdamW moments and step counts, every param-group value) and the
    # scheduler's learning rate continue exactly where the save left them.
    _assert_states_equal(result["loaded_optimizer"], result["saved_optimizer"])
    assert result["loaded_lr"] == result["saved_lr"]
    assert result["resumed_lrs"] == result["ref_lrs"][SAVE_AT:]
    # Same sharding, same ops: the resumed run is the uninterrupted one, bit for bit.
    assert result["resumed_losses"] == result["ref_losses"][SAVE_AT:]
    for name, state in result["ref_final"].items():
        _assert_states_equal(result["resumed_final"][name], state)


def test_failed_save_on_two_ranks_keeps_the_previous_checkpoint(sharded_run):
    out, result = sharded_run
    for failure in result["failed_save"]:  # raised on both ranks
        assert failure.startswith("CheckpointException") and "simulated failure" in failure
    assert result["failed_on_rank1"] == [
        "RuntimeError: writing the RNG states and meta.json failed on rank 1: "
        "OSError: simulated failure on rank 1",
        "OSError: simulated failure on rank 1",
    ]
    after = result["after_failure"]
    assert after["latest"] == f"step_{SAVE_AT:08d}"
    assert after["latest_checkpoint"] == f"step_{SAVE_AT:08d}"
    # The failed save's temporary directory stayed behind; keep=2 had pruned step 1.
    assert after["entries"] == [
        f".tmp-step_{SAVE_AT + 1:08d}",
        "latest",
        f"step_{SAVE_AT - 1:08d}",
        f"step_{SAVE_AT:08d}",
    ]
    # The next save removed it and pruned to the newest two.
    assert result["after_save"] == ["latest", f"step_{SAVE_AT:08d}", f"step_{TOTAL:08d}"]
    assert (out / "ckpt" / "latest").read_text() == f"step_{TOTAL:08d}\n"


def test_resume_on_one_process_unsharded(sharded_run):
    out, result = sharded_run
    named, optimizer, scheduler = build(1, shard=False)
    with pytest.warns(UserWarning, match="RNG states not restored.*2 rank"):
        info = load_checkpoint(
            out / "ckpt" / f"step_{SAVE_AT:08d}",
            model=named,
            optimizer=optimizer,
            scheduler=scheduler,
        )
    assert info["step"] == SAVE_AT
    assert scheduler.get_last_lr() == result["saved_lr"]
    _assert_states_equal(full_optimizer_state(named, optimizer), result["saved_optimizer"])
    losses, lrs = run(named, optimizer, scheduler, info["step"], TOTAL)
    assert lrs == result["ref_lrs"][SAVE_AT:]
    # One process on the whole batch against two ranks on halves: the same up to fp32 rounding.
    torch.testing.assert_close(losses, result["ref_losses"][SAVE_AT:], rtol=1e-5, atol=1e-6)
    # Adam turns rounding-sized gradient differences into differences of up to ~4e-6 in the
    # weights; a wrong optimizer state or lr would show at the size of the updates (~1e-3).
    for name, module in named.items():
        state = export_state_dict(module, hub_keys=False)
        _assert_states_equal(state, result["ref_final"][name], rtol=1e-4, atol=5e-5)


def _hub_models():
    """Ours flat and chunked, and DINOv2's code flat, of the worker's configuration."""
    ours = models.DinoVisionTransformer(**CONFIG, block_chunks=0, backend="torch")
    chunked = models.DinoVisionTransformer(**CONFIG, block_chunks=2, backend="torch")
    dinov2 = RefDinoVisionTransformer(**CONFIG, block_chunks=0)
    return ours, chunked, dinov2


def test_export_live_and_offline_load_into_hub_layout_models(sharded_run):
    out, result = sharded_run
    live = torch.load(out / "live_backbone.pt", weights_only=True)
    offline = export_state_dict(out / "ckpt", key="backbone")  # latest: the final step
    _assert_states_equal(offline, live)
    # The trained weights, under DINOv2's hub keys: blocks.{chunk}.{i} -> blocks.{i}.
    trained = result["resumed_final"]["backbone"]
    hub = {checkpoint._hub_key(k): v for k, v in trained.items()}
    assert "blocks.1.1.norm1.weight" in trained and "blocks.1.norm1.weight" in hub
    _assert_states_equal(offline, hub)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in offline.values())

    ours, chunked, dinov2 = _hub_models()
    ours.load_state_dict(offline, strict=True)
    dinov2.load_state_dict(offline, strict=True)
    models.load_weights(chunked, offline)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected = dinov2(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked(x), expected, rtol=1e-5, atol=1e-5)

    teacher = export_state_dict(out / "ckpt", key="teacher", hub_keys=False)
    _assert_states_equal(teacher, result["resumed_final"]["teacher"])


def test_bf16_teacher_after_forward_saves_and_loads_fp32_shards(sharded_run):
    out, result = sharded_run
    saved = export_state_dict(out / "bf16", key="teacher", hub_keys=False, dtype=None)
    _assert_states_equal(saved, result["bf16_teacher_init"])
    _assert_states_equal(result["bf16_loaded"], result["bf16_teacher_init"])
    assert result["bf16_same_output"]


# -- one process, no process group ----------------------------------------------------------------


def _train(seed: int, steps: int):
    named, optimizer, scheduler = build(seed, shard=False)
    run(named, optimizer, scheduler, 0, steps)
    return named, optimizer, scheduler


def test_single_process_round_trip(tmp_path):
    named, optimizer, scheduler = _train(0, 2)
    path = save_checkpoint(
        tmp_path,
        2,
        model=named,
        optimizer=optimizer,
        scheduler=scheduler,
        extra={"epoch": 0, "sampler": [1, 2]},
    )
    assert path == tmp_path / "step_00000002" and latest_checkpoint(tmp_path) == path
    saved_teacher = {k: v.clone() for k, v in named["teacher"].state_dict().items()}
    assert (tmp_path / "latest").read_text() == "step_00000002\n"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 2 and meta["world_size"] == 1
    assert meta["models"] == ["backbone", "head", "teacher"]
    assert (path / "rng" / "rank00000.pt").is_file()

    fresh, fresh_optimizer, fresh_scheduler = build(1, shard=False)
    info = load_checkpoint(
        tmp_path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler
    )
    assert info == {"step": 2, "extra": {"epoch": 0, "sampler": [1, 2]}, "path": path}
    for name in named:
        _assert_states_equal(fresh[name].state_dict(), named[name].state_dict())
    _assert_states_equal(
        full_optimizer_state(fresh, fresh_optimizer), full_optimizer_state(named, optimizer)
    )
    # mask_token gets no gradient: no AdamW state at the save, none after loading.
    assert not optimizer.state.get(named["backbone"].mask_token)
    assert not fresh_optimizer.state.get(fresh["backbone"].mask_token)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert run(fresh, fresh_optimizer, fresh_scheduler, 2, 4) == run(
        named, optimizer, scheduler, 2, 4
    )

    # Only the teacher, e.g. for evaluation.
    teacher = build(2, shard=False)[0]["teacher"]
    load_checkpoint(path, model={"teacher": teacher})
    _assert_states_equal(teacher.state_dict(), saved_teacher)


def test_saving_before_the_first_step_changes_nothing(tmp_path):
    # get_state_dict steps an optimizer without state once (zero gradients, lr 0): AdamW's step
    # counts would start at 1 and every later update would differ. Saving undoes it.
    named, optimizer, scheduler = build(0, shard=False)
    save_checkpoint(tmp_path, 0, model=named, optimizer=optimizer, scheduler=scheduler)
    assert not optimizer.state
    fresh, fresh_optimizer, fresh_scheduler = build(1, shard=False)
    load_checkpoint(tmp_path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert not any(fresh_optimizer.state.values())
    reference = _train(0, 3)
    assert run(fresh, fresh_optimizer, fresh_scheduler, 0, 3) == run(
        named, optimizer, scheduler, 0, 3
    )
    for name in named:
        _assert_states_equal(fresh[name].state_dict(), reference[0][name].state_dict())


def test_single_module_is_saved_as_model(tmp_path):
    backbone = models.DinoVisionTransformer(**CONFIG, block_chunks=2, backend="torch")
    save_checkpoint(tmp_path, 0, model=backbone)
    other = models.DinoVisionTransformer(**CONFIG, block_chunks=2, backend="torch")
    assert load_checkpoint(tmp_path, model=other)["step"] == 0
    _assert_states_equal(other.state_dict(), backbone.state_dict())
    exported = export_state_dict(tmp_path, tmp_path / "backbone.pth")
    assert torch.load(tmp_path / "backbone.pth", weights_only=True).keys() == exported.keys()
    flat = models.DinoVisionTransformer(**CONFIG, block_chunks=0, backend="torch")
    flat.load_state_dict(exported, strict=True)
    # A live plain model exports the same, and the dict does not alias its parameters.
    live = export_state_dict(backbone)
    _assert_states_equal(live, exported)
    live["cls_token"].add_(1)
    assert not torch.equal(live["cls_token"], backbone.cls_token)
    assert export_state_dict(backbone, hub_keys=False).keys() == backbone.state_dict().keys()
    block = export_state_dict(backbone, key="blocks.1.1")  # a submodule: block 1 in chunk 1
    _assert_states_equal(block, backbone.blocks[1][1].state_dict())
    with pytest.raises(ValueError, match="no submodule 'trunk'.*modules: blocks, cls_token"):
        export_state_dict(backbone, key="trunk")


def test_rng_states_are_restored(tmp_path):
    import random

    import numpy as np

    named = build(0, shard=False)[0]
    save_checkpoint(tmp_path, 5, model=named)
    drawn = (torch.rand(3), random.random(), np.random.rand(2))
    load_checkpoint(tmp_path, model=named)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(drawn[0], again[0]) and drawn[1] == again[1]
    assert np.array_equal(drawn[2], again[2])
    load_checkpoint(tmp_path, model=named, rng=False)
    assert not torch.equal(torch.rand(3), drawn[0])


def test_keep_deletes_old_checkpoints_but_never_latest(tmp_path):
    named = build(0, shard=False)[0]
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=named, keep=2)
    assert _steps(tmp_path) == ["step_00000004", "step_00000005"]
    for step in range(6, 9):
        save_checkpoint(tmp_path, step, model=named, keep=None)
    assert len(_steps(tmp_path)) == 5
    # A run that resumed from step 3 leaves newer directories of the abandoned run behind: keep
    # counts them, but the one just saved (latest) is never deleted.
    save_checkpoint(tmp_path, 3, model=named, keep=1)
    assert _steps(tmp_path) == ["step_00000003", "step_00000008"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000003"
    # Saving a step that exists replaces it.
    save_checkpoint(tmp_path, 8, model=named, keep=1, extra={"again": True})
    assert _steps(tmp_path) == ["step_00000008"]
    assert load_checkpoint(tmp_path, model=named)["extra"] == {"again": True}


def test_save_failing_in_the_writer_keeps_latest(tmp_path, monkeypatch):
    named, optimizer, scheduler = _train(0, 1)
    save_checkpoint(tmp_path, 1, model=named, optimizer=optimizer, scheduler=scheduler)
    saved = {k: v.clone() for k, v in named["backbone"].state_dict().items()}
    run(named, optimizer, scheduler, 1, 2)

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(FileSystemWriter, "finish", fail)
        with pytest.raises(BaseException, match="disk full"):  # DCP's CheckpointException
            save_checkpoint(tmp_path, 2, model=named, optimizer=optimizer, scheduler=scheduler)
    assert (tmp_path / ".tmp-step_00000002").is_dir()
    assert (tmp_path / "latest").read_text() == "step_00000001\n"
    fresh, fresh_optimizer, fresh_scheduler = build(1, shard=False)
    info = load_checkpoint(
        tmp_path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler
    )
    assert info["step"] == 1
    _assert_states_equal(fresh["backbone"].state_dict(), saved)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / ".tmp-step_00000002", model=fresh)

    save_checkpoint(tmp_path, 2, model=named, optimizer=optimizer, scheduler=scheduler)
    assert _entries(tmp_path) == ["latest", "step_00000001", "step_00000002"]


@pytest.mark.parametrize("mode", ["during-write", "before-pointer"])
def test_save_killed_midway_keeps_latest(tmp_path, mode):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(TESTS / "fsdp_checkpoint_worker_kill.py")
    done = subprocess.run(
        [sys.executable, script, mode, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, done.stderr[-3000:]
    assert (tmp_path / "latest").read_text() == "step_00000001\n"
    if mode == "during-write":  # the data files of step 2 are in the temporary directory
        assert any(p.suffix == ".distcp" for p in (tmp_path / ".tmp-step_00000002").iterdir())
        assert _steps(tmp_path) == ["step_00000001"]
    else:  # step 2 is complete, but latest was not moved: step 1 stays the checkpoint
        assert _steps(tmp_path) == ["step_00000001", "step_00000002"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"

    named, optimizer, scheduler = _train(0, 1)  # what the killed run had saved at step 1
    fresh, fresh_optimizer, fresh_scheduler = build(1, shard=False)
    info = load_checkpoint(
        tmp_path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler
    )
    assert info["step"] == 1
    for name in named:  # (the worker ran on one thread, this process on more)
        state = fresh[name].state_dict()
        _assert_states_equal(state, named[name].state_dict(), rtol=1e-5, atol=1e-6)

    # The resumed run saves step 2 again: the leftovers are removed or replaced.
    run(fresh, fresh_optimizer, fresh_scheduler, 1, 2)
    save_checkpoint(tmp_path, 2, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert _entries(tmp_path) == ["latest", "step_00000001", "step_00000002"]
    assert load_checkpoint(tmp_path, model=build(2, shard=False)[0])["step"] == 2


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / ".tmp-step_00000009").mkdir()  # an interrupted save is never a checkpoint
    assert latest_checkpoint(tmp_path) is None
    named = build(0, shard=False)[0]
    save_checkpoint(tmp_path, 1, model=named)
    save_checkpoint(tmp_path, 2, model=named)
    (tmp_path / "latest").write_text("step_00000007\n")
    with pytest.warns(UserWarning, match="not a complete checkpoint; using step_00000002"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"


# -- errors ---------------------------------------------------------------------------------------


def test_no_checkpoint_errors(tmp_path):
    named = build(0, shard=False)[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing", model=named)
    with pytest.raises(FileNotFoundError, match="no 'latest' pointer and no complete step_"):
        load_checkpoint(tmp_path, model=named)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        export_state_dict(tmp_path)


def test_mismatch_errors_name_the_keys(tmp_path):
    named, optimizer, scheduler = _train(0, 1)
    save_checkpoint(tmp_path / "full", 1, model=named, optimizer=optimizer, scheduler=scheduler)
    save_checkpoint(tmp_path / "bare", 1, model={"backbone": named["backbone"]})

    with pytest.raises(ValueError, match=r"has no model 'student'; it holds 'backbone', 'head'"):
        load_checkpoint(tmp_path / "full", model={"student": named["backbone"]})
    with pytest.raises(ValueError, match="has no model 'model'"):
        load_checkpoint(tmp_path / "full", model=named["backbone"])

    deeper = models.DinoVisionTransformer(**{**CONFIG, "depth": 4}, block_chunks=2)
    with pytest.raises(ValueError, match=r"in the checkpoint but not here|missing in the") as error:
        load_checkpoint(tmp_path / "full", model={"backbone": deeper})
    assert "missing in the checkpoint: backbone.blocks.0.1.attn.proj.bias" in str(error.value)

    wider = models.DinoVisionTransformer(**{**CONFIG, "embed_dim": 32}, block_chunks=2)
    with pytest.raises(ValueError, match=r"shapes differ: backbone.blocks.0.0.attn.proj.bias: "):
        load_checkpoint(tmp_path / "full", model={"backbone": wider})

    flat = models.DinoVisionTransformer(**CONFIG, block_chunks=0)
    with pytest.raises(ValueError, match="block_chunks differs"):
        load_checkpoint(tmp_path / "full", model={"backbone": flat})

    backbone_optimizer = torch.optim.AdamW(named["backbone"].parameters())
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(
            tmp_path / "bare", model={"backbone": named["backbone"]}, optimizer=backbone_optimizer
        )
    with pytest.raises(ValueError, match="holds no scheduler state"):
        load_checkpoint(
            tmp_path / "bare", model={"backbone": named["backbone"]}, scheduler=scheduler
        )

    # An optimizer over other parameters than the saved one's.
    both = torch.optim.AdamW(
        [*named["backbone"].parameters(), *named["head"].parameters(), nn.Parameter(torch.ones(2))]
    )
    with pytest.raises(ValueError, match="1 parameter.*in none of the models"):
        load_checkpoint(tmp_path / "full", model=named, optimizer=both)
    head_only = torch.optim.AdamW(named["head"].parameters())
    with pytest.raises(ValueError, match=r"optimizer state does not match.*\n.*not here: "):
        load_checkpoint(tmp_path / "full", model=named, optimizer=head_only)

    with pytest.raises(ValueError, match="several models .*choose one with key="):
        export_state_dict(tmp_path / "full")
    with pytest.raises(ValueError, match="has no model 'student'"):
        export_state_dict(tmp_path / "full", key="student")


def test_save_argument_errors(tmp_path):
    named, optimizer, _ = build(0, shard=False)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        save_checkpoint(tmp_path, -1, model=named)
    with pytest.raises(ValueError, match="keep must be an int >= 1 or None"):
        save_checkpoint(tmp_path, 1, model=named, keep=0)
    with pytest.raises(TypeError, match="extra must be JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model=named, extra={"rng": torch.get_rng_state()})
    with pytest.raises(ValueError, match="'optimizer' is reserved"):
        save_checkpoint(tmp_path, 1, model={"optimizer": named["head"]})
    with pytest.raises(ValueError, match="must be Python identifiers"):
        save_checkpoint(tmp_path, 1, model={"a.b": named["head"]})
    with pytest.raises(TypeError, match="model must be an nn.Module or a non-empty mapping"):
        save_checkpoint(tmp_path, 1, model={})
    with pytest.raises(ValueError, match="in none of the models"):
        save_checkpoint(tmp_path, 1, model={"head": named["head"]}, optimizer=optimizer)
    assert not any(tmp_path.iterdir())  # nothing written
