"""FSDP worker (tests/test_fsdp.py): sharded training against the unsharded model, EMA and
gradient clipping on shards, FSDP1 with our wrapping policy.

``torchrun --nproc_per_node=2 fsdp_worker.py OUT NAME [NAME ...]`` runs each named case and rank 0
writes ``OUT/<NAME>.json``; a case that raises writes ``{"error": traceback}`` instead, so that
one failure shows in its own test.

Training cases (:data:`CASES`): a tiny student (DINOv2 backbone + DINOHead) is copied before
sharding; the copy (the reference) trains in this process, unsharded, on the whole batch, the
sharded one on 2 ranks, each on its half, for STEPS AdamW steps. With stochastic depth the
reference runs the two halves with the ranks' seeds (the subset each rank draws depends on its
batch and seed) and averages their losses, which is the sharded run's arithmetic. Written:
the losses of both, the first step's gradients and the final weights (gathered full) as
(max |difference|, max |reference|) per parameter, and the state_dict keys.
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dinov2_reference import RefNestedBlock
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dinov2_fast import models
from dinov2_fast.fsdp import (
    clip_grad_norm_,
    ema_update_,
    shard_model,
    split_mixed_precision,
    wrap_policy,
)

STEPS = 3
BATCH = 8
LR = 1e-3
# Adam's eps: large enough that a gradient that is zero in exact arithmetic but rounding noise in
# practice (the key bias: softmax ignores it) does not become a full +-LR step in one run and not in
# the other; far below the gradients of every other parameter here.
EPS = 1e-4
WIDTH = 64

# name: (model options, shard_model options)
CASES: dict[str, tuple[dict, dict]] = {
    "fp32": ({}, {"param_dtype": None}),
    "fp32_chunks_drop_path": (
        {"block_chunks": 2, "drop_path_rate": 0.3, "call": "forward_features"},
        {"param_dtype": None},
    ),
    "checkpointing": (
        {"block_chunks": 2, "drop_path_rate": 0.3},
        {"param_dtype": None, "activation_checkpointing": True},
    ),
    "reshard_false": (
        {"drop_path_rate": 0.3},
        {"param_dtype": None, "reshard_after_forward": False},
    ),
    "hsdp": ({}, {"param_dtype": None, "mesh": (2, 1)}),
    "bf16": ({}, {}),
    "bf16_split": ({"block_chunks": 2, "drop_path_rate": 0.3}, {"split_precision": True}),
    "compile": (
        {"drop_path_rate": 0.3},
        {"param_dtype": None, "compile_blocks": {"backend": "aot_eager"}},
    ),
    "triton": ({"backend": "triton", "drop_path_rate": 0.3}, {"param_dtype": None}),
    "timm_patched": ({"kind": "timm", "drop_path_rate": 0.3}, {"param_dtype": None}),
    "dinov2_moduledict": ({"kind": "dinov2", "drop_path_rate": 0.3}, {"param_dtype": None}),
}


class Student(nn.Module):
    """A DINOv2 backbone and a DINO head; ``call`` picks how the backbone runs."""

    def __init__(self, block_chunks=0, drop_path_rate=0.0, backend="auto", call="forward"):
        super().__init__()
        self.backbone = models.DinoVisionTransformer(
            img_size=28,
            patch_size=14,
            embed_dim=WIDTH,
            depth=2,
            num_heads=2,
            init_values=0.5,
            block_chunks=block_chunks,
            drop_path_rate=drop_path_rate,
            drop_path_uniform=True,  # every block above 0.1: the subset form
            backend=backend,
        )
        self.dino_head = models.DINOHead(WIDTH, 32, hidden_dim=48, bottleneck_dim=16)
        self.call = call

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.call == "forward_features":
            cls = self.backbone.forward_features(images)["x_norm_clstoken"]
        else:
            cls = self.backbone(images)
        return self.dino_head(cls)


def timm_model(drop_path_rate=0.0, backend="auto") -> nn.Module:
    """timm's ViT of the same size with a 32-class head, patched with our kernels."""
    import timm

    from dinov2_fast import patch

    model = timm.models.vision_transformer.VisionTransformer(
        img_size=28,
        patch_size=14,
        embed_dim=WIDTH,
        depth=2,
        num_heads=2,
        num_classes=32,
        init_values=0.5,
        drop_path_rate=drop_path_rate,
    )
    patch(model, backend=backend)
    return model


class NestedTensorBlock(RefNestedBlock):
    """DINOv2's block under its own class name (tests/dinov2_reference.py re-implements it)."""


def dinov2_student(drop_path_rate=0.0) -> nn.ModuleDict:
    """DINOv2's student layout: a ModuleDict (no forward) of a backbone of DINOv2's classes
    (chunked), patched with our kernels, and a head; run by :func:`run`."""
    from dinov2_reference import RefDinoVisionTransformer

    from dinov2_fast import patch

    backbone = RefDinoVisionTransformer(
        img_size=28,
        patch_size=14,
        embed_dim=WIDTH,
        depth=2,
        num_heads=2,
        init_values=0.5,
        block_chunks=2,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=True,
        block_fn=NestedTensorBlock,
    )
    patch(backbone)
    head = models.DINOHead(WIDTH, 32, hidden_dim=48, bottleneck_dim=16)
    return nn.ModuleDict({"backbone": backbone, "dino_head": head})


def build(kind="student", **options) -> nn.Module:
    if kind == "timm":
        return timm_model(**options)
    if kind == "dinov2":
        return dinov2_student(**options)
    return Student(**options)


def run(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if isinstance(model, nn.ModuleDict):
        return model["dino_head"](model["backbone"](images))
    return model(images)


class CountForwards:
    """Counts the calls of our block's forward (recomputations included) while active."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        from dinov2_fast.nn.block import Block

        self.original = Block.forward

        def counted(module, *args, **kwargs):
            self.count += 1
            return self.original(module, *args, **kwargs)

        Block.forward = counted
        return self

    def __exit__(self, *exc):
        from dinov2_fast.nn.block import Block

        Block.forward = self.original


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DINO's cross-entropy against fixed teacher probabilities."""
    return -(targets * F.log_softmax(logits.float() / 0.1, dim=-1)).sum(-1).mean()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    images = torch.randn(BATCH, 3, 28, 28, generator=generator)
    targets = torch.softmax(torch.randn(BATCH, 32, generator=generator) / 0.5, dim=-1)
    return images, targets


def seed(step: int, rank: int) -> int:
    return 100 * step + rank + 7


def _errors(
    actual: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor] | None = None,
) -> dict[str, list[float]]:
    """Per tensor: [max |actual - reference|, max |reference|, ||actual - reference||,
    ||reference - initial|| (the reference's update; 0 without ``initial``)]."""
    out = {}
    for name, ref in reference.items():
        got = actual[name].detach().double()
        ref = ref.detach().double()
        update = 0.0 if initial is None else (ref - initial[name].double()).norm().item()
        diff = got - ref
        out[name] = [diff.abs().max().item(), ref.abs().max().item(), diff.norm().item(), update]
    return out


def _with_grads(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Copies of ``params`` holding copies of their gradients."""
    copies = []
    for param in params:
        copy_ = nn.Parameter(param.detach().clone())
        copy_.grad = param.grad.clone() if param.grad is not None else None
        copies.append(copy_)
    return copies


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _mesh(shape):
    if shape is None:
        return None
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _reference_run(model, images, targets, drop_path: bool, world: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    losses, first_grads = [], None
    for step in range(STEPS):
        if drop_path:  # the ranks' halves with the ranks' seeds
            parts = []
            for rank, (x, t) in enumerate(zip(images.chunk(world), targets.chunk(world))):
                torch.manual_seed(seed(step, rank))
                parts.append(loss_fn(run(model, x), t))
            loss = torch.stack(parts).mean()
        else:
            loss = loss_fn(run(model, images), targets)
        loss.backward()
        if step == 0:
            first_grads = {
                n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
            }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first_grads


def train_case(name: str, rank: int, world: int) -> dict:
    model_options, shard_options = CASES[name]
    model_options, shard_options = dict(model_options), dict(shard_options)
    shard_options["mesh"] = _mesh(shard_options.get("mesh"))
    torch.manual_seed(0)
    student = build(**model_options)
    reference = copy.deepcopy(student)
    initial = {n: t.clone() for n, t in student.state_dict().items()}
    images, targets = data()
    drop_path = model_options.get("drop_path_rate", 0.0) > 0

    result: dict = {}
    if rank == 0:
        result["ref_losses"], ref_grads = _reference_run(
            reference, images, targets, drop_path, world
        )
        result["ref_keys"] = sorted(reference.state_dict())

    shard_model(student, **shard_options)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, eps=EPS)
    x, t = images.chunk(world)[rank], targets.chunk(world)[rank]
    losses = []
    counter = CountForwards()
    for step in range(STEPS):
        torch.manual_seed(seed(step, rank))
        if "compile_blocks" in shard_options:
            loss = loss_fn(run(student, x), t)
            loss.backward()
        else:
            with counter:
                loss = loss_fn(run(student, x), t)
                loss.backward()
        if step == 0:
            grads = {n: _full(p.grad) for n, p in student.named_parameters() if p.grad is not None}
            # Gradients reduced in bf16 hold bf16 values; an fp32 reduction's mean of two bf16
            # values needs more bits: which units reduced in which dtype, seen from the outside.
            local = {n: _local(p.grad) for n, p in student.named_parameters() if p.grad is not None}
            result["bf16_exact"] = {
                part: all(
                    torch.equal(g, g.bfloat16().float()) for n, g in local.items() if part in n
                )
                for part in ("blocks.", "patch_embed.", "head.")
            }
            if rank == 0:
                result["grad_errors"] = _errors(grads, ref_grads)
                result["grad_names"] = sorted(grads)
                result["ref_grad_names"] = sorted(ref_grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        result["losses"] = losses
        result["keys"] = sorted(state)
        result["weight_errors"] = _errors(state, reference.state_dict(), initial)
        result["block_forwards"] = counter.count
        result["units"] = sorted(
            name for name, m in student.named_modules() if isinstance(m, FSDPModule)
        )
    return result


def ema_clip_case(rank: int, world: int) -> dict:
    """EMA and clipping on shards against the unsharded arithmetic and torch's clipping."""
    result: dict = {}
    torch.manual_seed(0)
    student = Student(block_chunks=2)
    torch.manual_seed(1)
    teacher = Student(block_chunks=2)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    extra = nn.Linear(5, 3)  # a plain module next to the sharded ones (same on both ranks)
    ref_extra = copy.deepcopy(extra)
    images, targets = data()

    # The reference gradients: the whole batch, unsharded.
    loss_fn(ref_student(images), targets).backward()
    probe = torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    ref_extra(probe).square().sum().backward()

    shard_model(student, param_dtype=None)
    shard_model(teacher, param_dtype=None)
    x, t = images.chunk(world)[rank], targets.chunk(world)[rank]
    loss_fn(student(x), t).backward()
    extra(probe).square().sum().backward()

    # EMA on shards.
    ema_update_(teacher, student, 0.9)
    full_teacher = {n: _full(p) for n, p in teacher.named_parameters()}
    with torch.no_grad():
        expected = {
            n: 0.9 * p + 0.1 * dict(ref_student.named_parameters())[n]
            for n, p in ref_teacher.named_parameters()
        }
    if rank == 0:
        result["ema_errors"] = _errors(full_teacher, expected)

    # Errors: a sharded student with an unsharded teacher; sharded on another mesh.
    plain_teacher = copy.deepcopy(ref_teacher)
    other = Student(block_chunks=2)
    shard_model(other, _mesh((world, 1)), param_dtype=None)
    messages = []
    for target in (plain_teacher, other):
        try:
            ema_update_(target, student, 0.9)
            messages.append(None)
        except ValueError as error:
            messages.append(str(error))
    result["ema_messages"] = messages

    # Clipping: the norm and the clipped gradients against torch's on the unsharded gradients
    # (the student's and the plain module's together), and against torch's on the DTensors.
    sharded_params = [*student.parameters(), *extra.parameters()]
    names = [f"student.{n}" for n, _ in student.named_parameters()]
    names += [f"extra.{n}" for n, _ in extra.named_parameters()]
    ref_params = [*ref_student.parameters(), *ref_extra.parameters()]
    saved = [p.grad for p in sharded_params]
    for norm_type in (2.0, float("inf")):
        copies = _with_grads(ref_params)
        ref_norm = torch.nn.utils.clip_grad_norm_(copies, 0.05, norm_type)
        torch_dtensor = None
        if norm_type == 2.0:  # torch's inf-norm fails on the ranks that hold an empty shard
            torch_dtensor = torch.nn.utils.clip_grad_norm_(list(student.parameters()), 1e9)
        for p, grad in zip(sharded_params, saved):
            p.grad = grad.clone() if grad is not None else None
        norm = clip_grad_norm_(sharded_params, 0.05, norm_type)
        clipped = {n: _full(p.grad) for n, p in zip(names, sharded_params) if p.grad is not None}
        expected = {n: p.grad for n, p in zip(names, copies) if p.grad is not None}
        if rank == 0:
            result["clip_inf" if norm_type == float("inf") else "clip_2"] = {
                "norm": norm.item(),
                "norm_class": type(norm).__name__,
                "ref_norm": ref_norm.item(),
                "torch_dtensor_norm": None
                if torch_dtensor is None
                else _full(torch_dtensor).item(),
                "ref_student_norm": torch.nn.utils.get_total_norm(
                    [p.grad for p in ref_student.parameters() if p.grad is not None], norm_type
                ).item(),
                "errors": _errors(clipped, expected),
                "names": sorted(clipped) == sorted(expected),
            }

    # HSDP (replicate 2 x shard 1): the replicas must not be counted twice.
    torch.manual_seed(0)
    hsdp = Student(block_chunks=2)
    shard_model(hsdp, _mesh((world, 1)), param_dtype=None)
    loss_fn(hsdp(x), t).backward()
    hsdp_full = [p.grad.full_tensor() for p in hsdp.parameters() if p.grad is not None]
    result["hsdp_norm"] = clip_grad_norm_(hsdp.parameters(), 1e9).item()
    result["hsdp_ref_norm"] = torch.nn.utils.get_total_norm(hsdp_full).item()
    return result


def fsdp1_case(rank: int, world: int) -> dict:
    """FSDP1 on the CPU (fp32) with wrap_policy: training as in the FSDP2 cases, then the EMA
    into a teacher wrapped alike (use_orig_params: each rank's views of its flat shards)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    student = Student(block_chunks=2)
    reference = copy.deepcopy(student)
    images, targets = data()
    result: dict = {}
    if rank == 0:
        result["ref_losses"], _ = _reference_run(reference, images, targets, False, world)
    backbone_policy, head_policy = split_mixed_precision(torch.bfloat16)
    result["policies"] = [
        str(backbone_policy.reduce_dtype),
        str(head_policy.reduce_dtype),
    ]
    sharded = FSDP(
        student,
        auto_wrap_policy=wrap_policy(student),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    result["units"] = sum(isinstance(m, FSDP) for m in sharded.modules())
    optimizer = torch.optim.AdamW(sharded.parameters(), lr=LR, eps=EPS)
    x, t = images.chunk(world)[rank], targets.chunk(world)[rank]
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(sharded(x), t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    full = StateDictOptions(full_state_dict=True)
    state = get_model_state_dict(sharded, options=full)
    if rank == 0:
        result["losses"] = losses
        result["weight_errors"] = _errors(state, reference.state_dict())

    torch.manual_seed(1)
    teacher = Student(block_chunks=2)
    before = {n: t.clone() for n, t in teacher.state_dict().items()}
    teacher = FSDP(
        teacher,
        auto_wrap_policy=wrap_policy(teacher),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    ema_update_(teacher, sharded, 0.9)
    after = get_model_state_dict(teacher, options=full)
    if rank == 0:
        expected = {n: 0.9 * before[n] + 0.1 * state[n] for n in state}
        result["ema_errors"] = _errors(after, expected)
    return result


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    from distributed import finish_worker, init_worker

    rank, world = init_worker()
    for name in sys.argv[2:]:
        try:
            if name in CASES:
                result = train_case(name, rank, world)
            elif name == "ema_clip":
                result = ema_clip_case(rank, world)
            elif name == "fsdp1":
                result = fsdp1_case(rank, world)
            else:
                raise ValueError(f"unknown case {name!r}")
        except Exception:
            result = {"error": f"rank {rank}: {traceback.format_exc()}"}
            print(result["error"], file=sys.stderr, flush=True)
        if rank == 0:
            (out / f"{name}.json").write_text(json.dumps(result))
        dist.barrier()
    finish_worker()


if __name__ == "__main__":
    main()
