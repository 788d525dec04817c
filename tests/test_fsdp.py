"""dinov2_fast.fsdp: sharding (FSDP2 and FSDP1), EMA and clipping on shards, the memory table.

The distributed cases run once, in one ``torchrun --nproc_per_node=2`` (gloo, CPU) launch of
tests/fsdp_worker.py (see its docstring); each test reads its case's result. The rest runs in this
process, without a process group.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from dinov2_reference import RefDINOHead, RefDinoVisionTransformer, RefNestedBlock
from distributed import load_result, torchrun
from torch import nn

from dinov2_fast import models, patch
from dinov2_fast.fsdp import (
    checkpoint_blocks,
    clip_grad_norm_,
    ema_update_,
    grad_norm,
    head_modules,
    memory_per_gpu,
    memory_table,
    mixed_precision,
    parameter_counts,
    shard_model,
    sharding,
    split_mixed_precision,
    wrap_policy,
)
from dinov2_fast.nn import Block

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "distributed.md"

FP32_CASES = [
    "fp32",
    "fp32_chunks_drop_path",
    "checkpointing",
    "reshard_false",
    "hsdp",
    "compile",
    "triton",
    "timm_patched",
    "dinov2_moduledict",
]
BF16_CASES = ["bf16", "bf16_split"]
OTHER_CASES = ["ema_clip", "fsdp1"]
STEPS, LR = 3, 1e-3  # as in fsdp_worker.py


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("fsdp_worker.py", 2, str(out), *FP32_CASES, *BF16_CASES, *OTHER_CASES, timeout=600)

    def load(name: str) -> dict:
        result = load_result(out / f"{name}.json")
        if "error" in result:
            pytest.fail(f"case {name} failed in the worker:\n{result['error']}")
        return result

    return load


# --- sharded training against the unsharded run ------------------------------------------------------


def _check_same_names(result: dict) -> None:
    assert result["keys"] == result["ref_keys"], "state_dict keys changed"
    assert result["grad_names"] == result["ref_grad_names"]


@pytest.mark.parametrize("case", FP32_CASES)
def test_sharded_training_matches_unsharded_fp32(results, case):
    """2 ranks x half the batch, sharded, equal the whole batch unsharded: the losses of every
    step, the first step's gradients and the weights after 3 AdamW steps, to fp32 rounding."""
    result = results(case)
    _check_same_names(result)
    for got, want in zip(result["losses"], result["ref_losses"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    for name, (err, ref, *_) in result["grad_errors"].items():
        assert err <= 1e-5 * max(ref, 1.0), f"{case}: grad {name}: {err} (max |ref| {ref})"
    for name, (err, ref, *_) in result["weight_errors"].items():
        assert err <= 1e-6 * max(ref, 1.0), f"{case}: weight {name}: {err} (max |ref| {ref})"


@pytest.mark.parametrize("case", BF16_CASES)
def test_sharded_training_matches_unsharded_bf16(results, case):
    """bf16 compute against the fp32 unsharded run: losses to 2%, gradients to 15% of each
    tensor's largest, and the weights' updates to 25% overall (AdamW normalises each element's
    step, so a bf16 rounding can flip the step of a near-zero gradient: per element only the
    bound 2·lr·steps holds)."""
    result = results(case)
    _check_same_names(result)
    for got, want in zip(result["losses"], result["ref_losses"], strict=True):
        assert got == pytest.approx(want, rel=2e-2)
    for name, (err, ref, *_) in result["grad_errors"].items():
        assert err <= 0.15 * ref + 1e-6, f"{case}: grad {name}: {err} (max |ref| {ref})"
    diff = math.sqrt(sum(e[2] ** 2 for e in result["weight_errors"].values()))
    update = math.sqrt(sum(e[3] ** 2 for e in result["weight_errors"].values()))
    assert diff <= 0.25 * update, f"{case}: weights differ by {diff / update:.3f} of the update"
    for name, (err, *_) in result["weight_errors"].items():
        assert err <= 2 * STEPS * LR * 1.05, f"{case}: weight {name}: {err}"


def test_units(results):
    """One unit per block (inside BlockChunks too), the head, the backbone below the model, the
    model; timm's blocks and classifier head, DINOv2's classes likewise."""
    flat = ["", "backbone", "backbone.blocks.0", "backbone.blocks.1", "dino_head"]
    assert results("fp32")["units"] == flat
    chunked = ["", "backbone", "backbone.blocks.0.0", "backbone.blocks.1.1", "dino_head"]
    assert results("fp32_chunks_drop_path")["units"] == chunked
    assert results("timm_patched")["units"] == ["", "blocks.0", "blocks.1", "head"]
    # DINOv2's ModuleDict student: no unit itself, its children are the roots.
    assert results("dinov2_moduledict")["units"] == chunked[1:]


def test_activation_checkpointing_recomputes_and_changes_nothing(results):
    """Each block runs twice per step (forward and recompute), the stochastic-depth subsets are
    redrawn identically: the same losses and weights as without, bit for bit."""
    plain, checkpointed = results("fp32_chunks_drop_path"), results("checkpointing")
    assert plain["block_forwards"] == STEPS * 2
    assert checkpointed["block_forwards"] == 2 * STEPS * 2
    assert checkpointed["losses"] == plain["losses"]
    assert checkpointed["weight_errors"] == plain["weight_errors"]


def test_split_precision_reduces_heads_in_fp32(results):
    """Gradients reduced in bf16 are bf16 values; the mean of two bf16 values in fp32 mostly is
    not. Split: blocks and the backbone root in bf16, the head in fp32; without: all in fp32."""
    assert results("bf16_split")["bf16_exact"] == {
        "blocks.": True,
        "patch_embed.": True,
        "head.": False,
    }
    assert results("bf16")["bf16_exact"] == {
        "blocks.": False,
        "patch_embed.": False,
        "head.": False,
    }


# --- EMA and clipping on shards ----------------------------------------------------------------------


def test_ema_on_shards_equals_unsharded(results):
    result = results("ema_clip")
    for name, (err, ref, *_) in result["ema_errors"].items():
        assert err <= 1e-6 * max(ref, 1.0), f"teacher {name}: {err}"
    unsharded, other_mesh = result["ema_messages"]
    assert "sharded (a DTensor) in the student but not in the teacher" in unsharded
    assert "different meshes" in other_mesh


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_clip_grad_norm_on_shards_equals_torch_unsharded(results, norm):
    """Sharded student and a plain module together: the norm and the clipped gradients equal
    torch's clip_grad_norm_ on the unsharded gradients; a plain tensor comes back."""
    result = results("ema_clip")[f"clip_{norm}"]
    assert result["norm_class"] == "Tensor"
    assert result["norm"] == pytest.approx(result["ref_norm"], rel=1e-6)
    assert result["names"]
    for name, (err, ref, *_) in result["errors"].items():
        assert err <= 1e-6 * max(ref, 1e-3), f"clipped grad {name}: {err} (max |ref| {ref})"
    if norm == "2":  # torch's on the DTensors agrees (its inf-norm fails on empty shards)
        assert result["torch_dtensor_norm"] == pytest.approx(result["ref_student_norm"], rel=1e-6)


def test_clip_grad_norm_hsdp_counts_replicas_once(results):
    result = results("ema_clip")
    assert result["hsdp_norm"] == pytest.approx(result["hsdp_ref_norm"], rel=1e-6)


def test_fsdp1_with_wrap_policy_matches_unsharded(results):
    result = results("fsdp1")
    assert result["units"] == 3  # the root and one per block
    assert result["policies"] == ["torch.bfloat16", "torch.float32"]
    for got, want in zip(result["losses"], result["ref_losses"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    for name, (err, ref, *_) in result["weight_errors"].items():
        assert err <= 1e-6 * max(ref, 1.0), f"weight {name}: {err}"
    assert result["ema_errors"].keys() == result["weight_errors"].keys()
    for name, (err, ref, *_) in result["ema_errors"].items():
        assert err <= 1e-6 * max(ref, 1.0), f"teacher {name}: {err}"


# --- in this process: finding units, errors, policies --------------------------------------------------


def _tiny(**kwargs) -> models.DinoVisionTransformer:
    options = dict(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=2, init_values=0.5)
    return models.DinoVisionTransformer(**{**options, **kwargs})


class NestedTensorBlock(RefNestedBlock):
    """DINOv2's block under its own class name (tests/dinov2_reference.py re-implements it)."""


def _dinov2_student() -> nn.ModuleDict:
    """DINOv2's student layout: a ModuleDict of the backbone (chunked) and the heads."""
    backbone = RefDinoVisionTransformer(
        img_size=28,
        patch_size=14,
        embed_dim=64,
        depth=4,
        num_heads=2,
        init_values=1.0,
        block_chunks=2,
        block_fn=NestedTensorBlock,
    )
    return nn.ModuleDict(
        {
            "backbone": backbone,
            "dino_head": RefDINOHead(64, 32, hidden_dim=48, bottleneck_dim=16),
            "ibot_head": RefDINOHead(64, 32, hidden_dim=48, bottleneck_dim=16),
        }
    )


def test_head_modules_and_backbones():
    student = _dinov2_student()
    assert [name for name, _ in head_modules(student)] == ["dino_head", "ibot_head"]
    blocks = [f"backbone.blocks.{i // 2}.{i}" for i in range(4)]
    assert sharding._backbones(student, blocks) == [("backbone", student["backbone"])]
    ours = nn.ModuleDict({"backbone": _tiny(), "head": models.DINOHead(64, 32, hidden_dim=48)})
    assert [name for name, _ in head_modules(ours)] == ["head"]
    assert head_modules(_tiny()) == []  # the Identity head holds no parameters


def test_wrap_policy_classes():
    import timm

    policy = wrap_policy()
    assert Block in policy._module_classes
    assert timm.models.vision_transformer.Block in policy._module_classes
    assert wrap_policy(_dinov2_student())._module_classes == {NestedTensorBlock}
    timm_model = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=2
    )
    patch(timm_model)
    classes = wrap_policy(timm_model)._module_classes
    assert classes == {type(timm_model.blocks[0])}  # the patched class
    assert issubclass(type(timm_model.blocks[0]), timm.models.vision_transformer.Block)
    with pytest.raises(ValueError, match="no transformer blocks.*recognised"):
        wrap_policy(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        wrap_policy("model")


def test_mixed_precision_presets():
    policy = mixed_precision()
    assert (policy.param_dtype, policy.reduce_dtype, policy.buffer_dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.float32,
    )
    backbone, head = split_mixed_precision(torch.float16)
    assert (backbone.param_dtype, backbone.reduce_dtype) == (torch.float16, torch.float16)
    assert (head.param_dtype, head.reduce_dtype) == (torch.float16, torch.float32)
    with pytest.raises(ValueError, match="floating"):
        mixed_precision(torch.int32)
    with pytest.raises(TypeError, match="torch.dtype"):
        mixed_precision("bf16")


def test_shard_model_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        shard_model("model")
    with pytest.raises(ValueError, match="no transformer blocks.*recognised: dinov2_fast.nn.Block"):
        shard_model(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="param_dtype"):
        shard_model(_tiny(), param_dtype=torch.int8)
    with pytest.raises(TypeError, match="reduce_dtype"):
        shard_model(_tiny(), reduce_dtype="fp32")
    with pytest.raises(TypeError, match="compile_blocks"):
        shard_model(_tiny(), compile_blocks="aot_eager")
    with pytest.raises(TypeError, match="activation_checkpointing"):
        shard_model(_tiny(), activation_checkpointing=1)
    with pytest.raises(TypeError, match="mesh"):
        shard_model(_tiny(), mesh=[0, 1])
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_model(_tiny())


def test_checkpointed_block_keeps_keys_and_gradients():
    """The class swap: same state_dict, same class name, an instance of the original class, and
    with stochastic depth (RNG preserved) the same outputs and gradients; idempotent."""
    torch.manual_seed(0)
    model = _tiny(drop_path_rate=0.4, drop_path_uniform=True, block_chunks=2)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert checkpoint_blocks(checkpoint_blocks(model)) is model
    assert list(model.state_dict()) == keys
    block = model.blocks[1][1]
    assert isinstance(block, Block) and type(block).__name__ == "Block"
    assert type(block).__mro__[2] is Block  # swapped once
    images = torch.randn(6, 3, 28, 28)
    outputs = []
    for net in (reference, model):
        torch.manual_seed(3)
        out = net(images)
        out.square().sum().backward()
        outputs.append((out, [p.grad for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=0, atol=0)
    for got, want in zip(outputs[1][1], outputs[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_checkpoint_blocks_errors():
    with pytest.raises(ValueError, match="no transformer blocks"):
        checkpoint_blocks(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        checkpoint_blocks(None)


def test_checkpointed_patched_dinov2_block():
    model = _dinov2_student()["backbone"]
    patch(model)
    block = model.blocks[0][0]
    checkpoint_blocks(model)
    assert isinstance(block, NestedTensorBlock)
    assert type(block).__mro__[1] is sharding._CheckpointedForward
    out = model(torch.randn(2, 3, 28, 28))
    out.sum().backward()
    assert block.attn.qkv.weight.grad is not None


# --- EMA and clipping on plain modules -----------------------------------------------------------------


def test_ema_update_plain_modules():
    torch.manual_seed(0)
    student, teacher = _tiny(), _tiny()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ema_update_(teacher, student, 0.99)
    for name, param in teacher.named_parameters():
        want = 0.99 * before[name] + 0.01 * dict(student.named_parameters())[name]
        torch.testing.assert_close(param, want, rtol=1e-6, atol=1e-7)
    ema_update_(teacher, student, 1.0)  # unchanged
    ema_update_(teacher, student, torch.tensor(0.0))  # a copy
    for (_, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
        assert torch.equal(t, s)


def test_ema_update_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update_(_tiny(), _tiny(), 1.5)
    with pytest.raises(TypeError, match="momentum"):
        ema_update_(_tiny(), _tiny(), "0.9")
    with pytest.raises(TypeError, match="teacher"):
        ema_update_(None, _tiny(), 0.9)
    with pytest.raises(ValueError, match="only in the teacher"):
        ema_update_(_tiny(num_register_tokens=1), _tiny(), 0.9)
    with pytest.raises(ValueError, match="shape"):
        ema_update_(_tiny(img_size=42), _tiny(), 0.9)


def _with_grads(seed: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape, dtype in [((7, 5), torch.float32), ((3,), torch.float32), ((4, 4), torch.bfloat16)]:
        param = nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
        param.grad = torch.randn(shape, generator=generator).to(dtype) * 3
        params.append(param)
    params.append(nn.Parameter(torch.randn(2)))  # no gradient: skipped
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.5, float("inf"), "inf"])
def test_clip_grad_norm_plain_equals_hand_computation(norm_type):
    params = _with_grads(0)
    grads = [p.grad.clone() for p in params if p.grad is not None]
    p = math.inf if norm_type == "inf" else float(norm_type)
    flat = torch.cat([g.double().flatten() for g in grads])
    want = flat.abs().max() if math.isinf(p) else flat.abs().pow(p).sum().pow(1 / p)
    total = clip_grad_norm_(params, 1.0, norm_type)
    assert type(total) is torch.Tensor and total.dtype == torch.float32
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    scale = min(1.0 / (want.item() + 1e-6), 1.0)
    for param, grad in zip([q for q in params if q.grad is not None], grads):
        tolerance = 1e-2 if grad.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(param.grad.float(), grad.float() * scale, rtol=tolerance, atol=0)
    torch_params = _with_grads(0)
    torch_total = torch.nn.utils.clip_grad_norm_(torch_params[:2], 1.0, p)
    ours = _with_grads(0)
    assert clip_grad_norm_(ours[:2], 1.0, p).item() == pytest.approx(torch_total.item(), rel=1e-6)
    for mine, theirs in zip(ours[:2], torch_params[:2]):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=0)


def test_clip_grad_norm_no_clipping_below_max_and_errors():
    params = _with_grads(1)
    grads = [p.grad.clone() for p in params if p.grad is not None]
    clip_grad_norm_(params, 1e6)
    for param, grad in zip(params, grads):
        torch.testing.assert_close(param.grad, grad, rtol=1e-6, atol=0)
    assert grad_norm([nn.Parameter(torch.ones(2))]).item() == 0.0
    params[0].grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="positive"):
        clip_grad_norm_(params, 1.0, norm_type=0)
    with pytest.raises(TypeError, match="max_norm"):
        clip_grad_norm_(params, "1.0")


# --- memory ----------------------------------------------------------------------------------------------


def test_parameter_counts():
    """DINOv2's counts: hub configs (image 518) 22.06M / 86.58M / 304.37M / 1136.48M."""
    for arch, hub in [
        ("vit_small", 22.06e6),
        ("vit_base", 86.58e6),
        ("vit_large", 304.37e6),
        ("vit_giant2", 1136.48e6),
    ]:
        assert parameter_counts(arch, img_size=518).total == pytest.approx(hub, abs=0.01e6)
    counts = parameter_counts("vit_large")
    assert counts.total == 303_228_928  # at 224: pos_embed of 257 positions
    assert counts.units == (12_598_272,) * 24
    assert counts.root == counts.total - 24 * 12_598_272
    with_heads = parameter_counts("vit_large", "dino")
    assert with_heads.total - counts.total == 23_662_848  # DINOHead(1024, 65536)
    assert len(parameter_counts("vit_large", "dino+ibot").units) == 26


def test_memory_per_gpu_numbers():
    p = parameter_counts("vit_large", img_size=518).total
    none = memory_per_gpu("vit_large", 8, "none", img_size=518)
    assert none.weights / 1e9 == pytest.approx(1.22, abs=0.005)  # 304M fp32
    assert (none.grads, none.optimizer, none.teacher, none.gathered) == (4 * p, 8 * p, 4 * p, 2 * p)
    assert none.total == 22 * p
    full = memory_per_gpu("vit_large", 8, "full")
    p224, block = full.params, 12_598_272
    assert full.weights == 4 * p224 / 8 and full.optimizer == 8 * p224 / 8
    root = parameter_counts("vit_large").root
    assert full.gathered == 2 * (root + 2 * block) + 4 * block
    grad_op = memory_per_gpu("vit_large", 8, "grad_op")
    assert grad_op.gathered == 2 * p224 + 4 * block and grad_op.weights == full.weights
    hybrid = memory_per_gpu("vit_large", 64, "hybrid", hybrid_shard_size=8)
    assert hybrid.shard_size == 8 and hybrid.total == full.total
    assert memory_per_gpu("vit_large", 4, "hybrid").shard_size == 4
    with pytest.raises(ValueError, match="multiple"):
        memory_per_gpu("vit_large", 12, "hybrid")
    with pytest.raises(ValueError, match="sharding"):
        memory_per_gpu("vit_large", 8, "zero3")
    with pytest.raises(ValueError, match="arch"):
        memory_per_gpu("vit_huge", 8)
    with pytest.raises(ValueError, match="world_size"):
        memory_per_gpu("vit_large", 0)


def _doc_tables() -> dict[str, str]:
    text = DOC.read_text()
    found = re.findall(r"<!-- memory-table (\{.*?\}) -->\n(.*?)<!-- /memory-table -->", text, re.S)
    return dict(found)


def test_doc_memory_tables_match_memory_table():
    """docs/distributed.md's tables are memory_table's output for the arguments in their
    markers: rerun memory_table and paste when the model changes."""
    tables = _doc_tables()
    assert len(tables) >= 2
    for arguments, table in tables.items():
        kwargs = json.loads(arguments)
        for key in ("archs", "world_sizes", "shardings"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        assert table == memory_table(**kwargs), f"docs/distributed.md table {arguments} drifted"
    default = next(t for a, t in tables.items() if a == "{}")
    for arch in ("ViT-S/14", "ViT-B/14", "ViT-L/14", "ViT-g/14"):
        for sharding_choice in ("none", "grad_op", "full", "hybrid (G=8)"):
            for gpus in (1, 8, 64):
                assert f"| {arch} |" in default and f"| {sharding_choice} | {gpus} |" in default
