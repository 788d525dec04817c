"""Checkpoint worker (tests/test_fsdp_checkpoint.py): a tiny sharded teacher/student run that
saves, fails to save, resumes and exports.

``torchrun --nproc_per_node=2 fsdp_checkpoint_worker.py OUT`` runs, on FSDP2-sharded models:

1. the reference: TOTAL steps uninterrupted;
2. the same run from the same seed to step SAVE_AT, saving after every step (keep=2), one more
   step, then two saves at SAVE_AT + 1 that fail: in DCP's writer on rank 0 after the data files
   are written, and in our code on rank 1 only;
3. a resume from the directory (latest = SAVE_AT) into models built from another seed, run to
   TOTAL, saved (which cleans up the failed save), and the live backbone exported;
4. a bf16 teacher whose blocks stay unsharded after a no-grad forward: saved, and loaded into
   another such teacher.

Rank 0 writes ``OUT/result.pt``. The test imports :func:`build` and :func:`run` to resume the
same checkpoint in a single process, unsharded.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from dinov2_fast import models
from dinov2_fast.fsdp.checkpoint import (
    export_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

TOTAL = 6
SAVE_AT = 3
BATCH = 4  # global; each of W ranks gets BATCH / W samples
WARMUP = 2
EMA = 0.9
CONFIG = dict(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=2, init_values=0.5)


def _lr_factor(step: int) -> float:
    """Linear warmup, then cosine to 0 at TOTAL."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL - WARMUP)))


def _shard(named: dict[str, nn.Module]) -> None:
    """FSDP2 in fp32: the backbones with shard_model (a unit per block), the head whole."""
    from torch.distributed.fsdp import fully_shard

    from dinov2_fast.fsdp import shard_model

    shard_model(named["backbone"], param_dtype=None)
    shard_model(named["teacher"], param_dtype=None)
    fully_shard(named["head"])


def build(seed: int, shard: bool):
    """{"backbone", "head", "teacher"} (teacher = EMA copy of the backbone), AdamW over the
    student, a LambdaLR warmup/cosine; FSDP2-sharded per block with ``shard``."""
    torch.manual_seed(seed)
    backbone = models.DinoVisionTransformer(**CONFIG, block_chunks=2, backend="torch")
    head = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))
    teacher = copy.deepcopy(backbone).requires_grad_(False)
    named = {"backbone": backbone, "head": head, "teacher": teacher}
    if shard:
        _shard(named)
    student = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(student, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor)
    return named, optimizer, scheduler


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step ``step``'s data (the same for any world size)."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 3, 28, 28, generator=generator)
    target = torch.randn(BATCH, 16, generator=generator)
    share = BATCH // world
    return x[rank * share : (rank + 1) * share], target[rank * share : (rank + 1) * share]


def run(named, optimizer, scheduler, start: int, stop: int, rank: int = 0, world: int = 1):
    """Steps ``start`` .. ``stop - 1``: (global losses, learning rates used)."""
    losses, lrs = [], []
    for step in range(start, stop):
        x, target = batch(step, rank, world)
        with torch.no_grad():
            teacher = named["teacher"](x)
        if hasattr(named["teacher"], "reshard"):  # FSDP2 keeps a root unsharded after forward
            named["teacher"].reshard()
        student = named["backbone"](x)
        loss = (named["head"](student) - target).square().mean()
        loss = loss + (student - teacher).square().mean()
        loss.backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        with torch.no_grad():
            for t, s in zip(named["teacher"].parameters(), named["backbone"].parameters()):
                t.lerp_(s, 1 - EMA)
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss = loss / world
        losses.append(loss.item())
    return losses, lrs


def full_optimizer_state(named, optimizer) -> dict:
    """The optimizer state, gathered (rank 0), keyed by FQN; collective."""
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True
    )
    state = get_optimizer_state_dict(nn.ModuleDict(named), optimizer, options=options)
    # Copies: the "step" tensors are the optimizer's own, incremented in place by later steps.
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def exports(named) -> dict:
    return {name: export_state_dict(module, hub_keys=False) for name, module in named.items()}


def main() -> None:
    from distributed import finish_worker, init_worker

    out = Path(sys.argv[1])
    directory = out / "ckpt"
    rank, world = init_worker()
    result: dict = {"world": world}

    named, optimizer, scheduler = build(0, shard=True)
    result["ref_losses"], result["ref_lrs"] = run(
        named, optimizer, scheduler, 0, TOTAL, rank, world
    )
    result["ref_final"] = exports(named)

    named, optimizer, scheduler = build(0, shard=True)
    for step in range(SAVE_AT):
        run(named, optimizer, scheduler, step, step + 1, rank, world)
        save_checkpoint(
            directory,
            step + 1,
            model=named,
            optimizer=optimizer,
            scheduler=scheduler,
            extra={"images_seen": (step + 1) * BATCH},
            keep=2,
        )
    result["saved_optimizer"] = full_optimizer_state(named, optimizer)
    result["saved_lr"] = scheduler.get_last_lr()
    run(named, optimizer, scheduler, SAVE_AT, SAVE_AT + 1, rank, world)

    # A save that fails on rank 0 after every rank has written its data files.
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException

    original_finish = FileSystemWriter.finish

    def failing_finish(self, *args, **kwargs):
        raise OSError("simulated failure while writing the metadata")

    FileSystemWriter.finish = failing_finish
    failure = None
    try:
        save_checkpoint(directory, SAVE_AT + 1, model=named, optimizer=optimizer, keep=2)
    except (CheckpointException, OSError) as error:  # DCP raises it on every rank
        failure = f"{type(error).__name__}: {error}"[-1000:]
    finally:
        FileSystemWriter.finish = original_finish
    result["failed_save"] = [None] * world
    dist.all_gather_object(result["failed_save"], failure)
    # A save that fails on rank 1 only, in our code (its RNG file): every rank raises.
    from dinov2_fast.fsdp import checkpoint

    original_rng_state = checkpoint._rng_state

    def failing_rng_state():
        if rank == 1:
            raise OSError("simulated failure on rank 1")
        return original_rng_state()

    checkpoint._rng_state = failing_rng_state
    failure = None
    try:
        save_checkpoint(directory, SAVE_AT + 1, model=named, optimizer=optimizer, keep=2)
    except (RuntimeError, OSError) as error:
        failure = f"{type(error).__name__}: {error}"
    finally:
        checkpoint._rng_state = original_rng_state
    result["failed_on_rank1"] = [None] * world
    dist.all_gather_object(result["failed_on_rank1"], failure)
    result["after_failure"] = {
        "latest": (directory / "latest").read_text().strip(),
        "entries": sorted(p.name for p in directory.iterdir()),
        "latest_checkpoint": latest_checkpoint(directory).name,
    }

    named, optimizer, scheduler = build(1, shard=True)
    info = load_checkpoint(directory, model=named, optimizer=optimizer, scheduler=scheduler)
    result["loaded"] = {"step": info["step"], "extra": info["extra"], "path": info["path"].name}
    result["loaded_optimizer"] = full_optimizer_state(named, optimizer)
    result["loaded_lr"] = scheduler.get_last_lr()
    losses, lrs = run(named, optimizer, scheduler, info["step"], TOTAL, rank, world)
    result["resumed_losses"], result["resumed_lrs"] = losses, lrs
    result["resumed_final"] = exports(named)
    save_checkpoint(directory, TOTAL, model=named, optimizer=optimizer, scheduler=scheduler, keep=2)
    result["after_save"] = sorted(p.name for p in directory.iterdir())
    export_state_dict(named["backbone"], out / "live_backbone.pt")

    # A bf16 teacher after a forward without backward, its blocks not resharded (SHARD_GRAD_OP):
    # they hold their gathered bf16 parameters, and the checkpoint must hold the fp32 shards.
    from dinov2_fast.fsdp import shard_model

    teacher = build(2, shard=False)[0]["teacher"]
    result["bf16_teacher_init"] = {k: v.clone() for k, v in teacher.state_dict().items()}
    shard_model(teacher, param_dtype=torch.bfloat16, reshard_after_forward=False)
    with torch.no_grad():
        teacher(batch(0, rank, world)[0])
    save_checkpoint(out / "bf16", 0, model={"teacher": teacher})
    # ... and loading into such a teacher takes effect at its next forward.
    other = build(3, shard=False)[0]["teacher"]
    shard_model(other, param_dtype=torch.bfloat16, reshard_after_forward=False)
    x = batch(1, rank, world)[0]
    with torch.no_grad():
        other(x)
        load_checkpoint(out / "bf16", model={"teacher": other})
        result["bf16_same_output"] = torch.equal(other(x), teacher(x))
    result["bf16_loaded"] = export_state_dict(other, hub_keys=False)

    if rank == 0:
        torch.save(result, out / "result.pt")
    finish_worker()


if __name__ == "__main__":
    main()
