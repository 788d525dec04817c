"""dinov2_fast.train losses, schedules and parameter groups against float64 references written
here from DINOv2's formulas, hand-computed schedule values and DINOv2's parameter-group rules; the
losses' cross-process reductions under torchrun (2 gloo processes)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from distributed import load_result, torchrun
from reference import assert_close_to_reference
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from train_losses_worker import IBOT_SPLIT, TEMP, K, worker_data

from dinov2_fast import models
from dinov2_fast.train.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2_fast.train.param_groups import (
    apply_optim_scheduler,
    fuse_params_groups,
    get_params_groups_with_decay,
)
from dinov2_fast.train.schedules import CosineScheduler, build_schedules, scaled_lr

# ---- float64 references (DINOv2's formulas) -----------------------------------------------------


def ref_dino_loss(students, teachers, temp=0.1):
    total = torch.zeros((), dtype=torch.float64)
    for s in students:
        lsm = F.log_softmax(s.double() / temp, dim=-1)
        for t in teachers:
            total = total - torch.sum(t.double() * lsm, dim=-1).mean()
    return total


def ref_softmax_center(t, center, temp):
    return F.softmax((t.double() - center.double().reshape(-1)) / temp, dim=-1)


def ref_sinkhorn(logits, temp, n_iterations=3, n_samples=None):
    """One process, all the rows: Q = exp(t/temp)ᵀ, total 1, rows 1/K, columns 1/B, ×B."""
    q = torch.exp(logits.double() / temp).t()
    k, b = q.shape[0], q.shape[1] if n_samples is None else n_samples
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def ref_ibot_loss(s, t, masks, temp=0.1, n=None, weights=None):
    per_token = torch.sum(t.double() * F.log_softmax(s.double() / temp, dim=-1), dim=-1)
    if weights is None:
        counts = masks.sum(-1).clamp(min=1).double()
        weights = (1 / counts)[:, None].expand_as(masks)[masks]
    if n is not None:
        per_token = per_token[:n]
    return -(per_token * weights.double()).sum() / masks.shape[0]


def ref_koleo(x, eps=1e-8):
    """Brute force: each row's smallest distance to another row, after L2 normalisation."""
    x = F.normalize(x.double(), dim=-1, eps=eps)
    n = x.shape[0]
    nearest = torch.stack(
        [min(torch.linalg.vector_norm(x[i] - x[j]) for j in range(n) if j != i) for i in range(n)]
    )
    return -torch.log(nearest + eps).mean()


# ---- DINO loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,n_students", [(1, 37, 1), (13, 261, 3), (50, 1000, 2)])
def test_dino_loss_matches_reference(dtype, rows, k, n_students):
    loss_fn = DINOLoss(k)
    students = [(torch.randn(rows, k) * 3).to(dtype).requires_grad_() for _ in range(n_students)]
    teachers = [F.softmax(torch.randn(rows, k) / 0.07, -1).to(dtype) for _ in range(2)]
    loss = loss_fn(students, teachers)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref_students = [s.detach().double().requires_grad_() for s in students]
    ref = ref_dino_loss(ref_students, teachers)
    assert_close_to_reference(loss.detach(), ref, "dino loss", condition=30 * n_students)
    loss.backward()
    ref.backward()
    for s, r in zip(students, ref_students):
        assert_close_to_reference(s.grad, r.grad, "dino grad")


def test_dino_loss_takes_dinov2_call_forms():
    """DINOv2 passes student chunks as a tuple and the teacher targets as one [2, B, K] tensor."""
    loss_fn = DINOLoss(50, student_temp=0.2)
    local = torch.randn(4 * 7, 50)
    teacher = F.softmax(torch.randn(2, 7, 50), -1)
    loss = loss_fn(local.chunk(4), teacher)
    ref = ref_dino_loss(local.chunk(4), list(teacher), temp=0.2)
    assert_close_to_reference(loss, ref, "dino loss (tensor list)", condition=40)


def test_dino_softmax_center_and_ema():
    """The center used at step n is the EMA (momentum 0.9) of the batch means of steps < n."""
    loss_fn = DINOLoss(41, center_momentum=0.9)
    center = torch.zeros(1, 41, dtype=torch.float64)
    for step in range(4):
        logits = (torch.randn(9, 41) + step).to(torch.bfloat16)
        probs = loss_fn.softmax_center_teacher(logits, 0.04)
        assert probs.dtype == torch.float32 and probs.shape == (9, 41)
        assert_close_to_reference(probs, ref_softmax_center(logits, center, 0.04), "probs")
        loss_fn.update_center(logits)
        center = 0.9 * center + 0.1 * logits.double().mean(0, keepdim=True)
        # the state dict carries the update in flight (DINOv2's would not until the next step)
        assert_close_to_reference(loss_fn.state_dict()["center"], center, "center")
    assert loss_fn.center.shape == (1, 41)


def test_center_survives_a_checkpoint():
    """Save right after update_center, load into a fresh loss: the next targets agree."""
    a, b = DINOLoss(16), DINOLoss(16)
    for _ in range(2):
        logits = torch.randn(6, 16)
        a.softmax_center_teacher(logits, 0.05)
        a.update_center(logits)
    b.load_state_dict(a.state_dict())
    logits = torch.randn(6, 16)
    torch.testing.assert_close(
        a.softmax_center_teacher(logits, 0.05), b.softmax_center_teacher(logits, 0.05)
    )
    b.update_center(torch.randn(6, 16))
    b.load_state_dict(a.state_dict())  # a pending update is dropped by a load
    torch.testing.assert_close(b.center, a.center)
    assert "x.center" in torch.nn.ModuleDict({"x": a}).state_dict()


# ---- Sinkhorn-Knopp -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k", [(1, 37), (24, 257), (50, 7)])
def test_sinkhorn_knopp_matches_reference(dtype, rows, k):
    logits = torch.randn(rows, k).to(dtype)
    probs = DINOLoss(k).sinkhorn_knopp_teacher(logits, 0.07)
    assert probs.dtype == torch.float32 and probs.shape == (rows, k)
    assert_close_to_reference(probs, ref_sinkhorn(logits, 0.07), "sinkhorn", condition=4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(rows))  # each sample: a distribution
    ibot = iBOTPatchLoss(k).sinkhorn_knopp_teacher(logits, 0.07, torch.tensor([rows]))
    torch.testing.assert_close(ibot, probs)
    torch.testing.assert_close(iBOTPatchLoss(k).sinkhorn_knopp_teacher(logits, 0.07, rows), probs)


def test_sinkhorn_knopp_converges_to_equal_prototypes():
    """Enough iterations make each prototype's total weight B/K (rows still sum to 1)."""
    rows, k = 40, 8
    probs = DINOLoss(k).sinkhorn_knopp_teacher(torch.randn(rows, k), 0.5, n_iterations=200)
    torch.testing.assert_close(probs.sum(0), torch.full((k,), rows / k), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(probs.sum(1), torch.ones(rows))


def test_sinkhorn_knopp_survives_overflow():
    """logits / temp beyond float32's exp range (an offset of 10 at temp 0.04): DINOv2's would be
    NaN; ours equals the reference on logits shifted by a constant (the normalisation cancels it)."""
    logits = torch.randn(12, 37) + 10
    probs = DINOLoss(37).sinkhorn_knopp_teacher(logits, 0.04)
    assert torch.isfinite(probs).all()
    shifted = logits.double() - logits.max()
    assert_close_to_reference(probs, ref_sinkhorn(shifted, 0.04), "sinkhorn (large)", condition=4)


def test_ibot_sinkhorn_uses_the_masked_count_and_keeps_the_callers_tensor():
    logits = torch.randn(11, 29)
    count = torch.tensor([11])
    probs = iBOTPatchLoss(29).sinkhorn_knopp_teacher(logits, 0.05, count)
    assert count.item() == 11
    assert_close_to_reference(probs, ref_sinkhorn(logits, 0.05, n_samples=11), "ibot sinkhorn")


# ---- iBOT loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("images,tokens,k", [(1, 5, 37), (6, 37, 261), (4, 50, 1000)])
def test_ibot_loss_matches_reference(dtype, images, tokens, k):
    masks = torch.rand(images, tokens) < 0.4
    masks[0, 0] = True  # at least one masked token
    if images > 2:
        masks[1] = False  # an image without masks still counts in the division
    m = int(masks.sum())
    s = (torch.randn(m, k) * 3).to(dtype).requires_grad_()
    t = F.softmax(torch.randn(m, k) / 0.07, -1).to(dtype)
    loss = iBOTPatchLoss(k).forward_masked(s, t, masks)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    s_ref = s.detach().double().requires_grad_()
    ref = ref_ibot_loss(s_ref, t, masks)
    assert_close_to_reference(loss.detach(), ref, "ibot loss", condition=30)
    loss.backward()
    ref.backward()
    assert_close_to_reference(s.grad, s_ref.grad, "ibot grad")


def test_ibot_loss_with_padding_and_given_weights():
    """DINOv2's call: inputs padded to an upper bound, the true count, the collate's weights."""
    masks = torch.rand(5, 23) < 0.3
    masks[2, 3] = True
    m, k = int(masks.sum()), 31
    s, t = torch.randn(m + 6, k), F.softmax(torch.randn(m + 6, k), -1)
    weights = (1 / masks.sum(-1).clamp(min=1))[:, None].expand_as(masks)[masks]
    loss_fn = iBOTPatchLoss(k)
    padded = loss_fn.forward_masked(
        s, t, masks, n_masked_patches=torch.tensor([m]), masks_weight=weights
    )
    exact = loss_fn.forward_masked(s[:m], t[:m], masks)
    torch.testing.assert_close(padded, exact)
    assert_close_to_reference(padded, ref_ibot_loss(s, t, masks, n=m), "ibot (padded)", 30)
    other = torch.rand(m)
    assert_close_to_reference(
        loss_fn.forward_masked(s, t, masks, m, other),
        ref_ibot_loss(s, t, masks, n=m, weights=other),
        "ibot (weights)",
        30,
    )


def test_ibot_center_ema_and_shapes():
    """DINOv2's iBOT center: the mean over groups (and processes) of each group's token mean."""
    loss_fn = iBOTPatchLoss(19)
    center = torch.zeros(19, dtype=torch.float64)
    for step, shape in enumerate([(1, 13, 19), (13, 19), (3, 5, 19)]):
        logits = torch.randn(shape) + step
        probs = loss_fn.softmax_center_teacher(logits, 0.06)
        assert probs.shape == logits.shape  # DINOv2 broadcasts [M, K] to [1, M, K]
        assert_close_to_reference(probs, ref_softmax_center(logits, center, 0.06), "ibot probs")
        loss_fn.update_center(logits)
        groups = logits.double().reshape(-1, *logits.shape[-2:])
        center = 0.9 * center + 0.1 * groups.mean(1).mean(0)
    assert loss_fn.state_dict()["center"].shape == (1, 1, 19)
    assert_close_to_reference(loss_fn.state_dict()["center"].reshape(-1), center, "ibot center")


# ---- KoLeo --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(2, 5), (37, 16), (50, 7)])
def test_koleo_matches_brute_force(dtype, rows, dim):
    x = torch.randn(rows, dim).to(dtype).requires_grad_()
    loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    assert_close_to_reference(loss.detach(), ref_koleo(x.detach()), "koleo", condition=4)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_koleo_antipodal_pair_and_autocast():
    x = torch.randn(1, 9)
    pair = torch.cat([x, -x])  # DINOv2's −1 on the diagonal ties with the neighbour here
    torch.testing.assert_close(KoLeoLoss()(pair), torch.tensor(-math.log(2.0)))
    feats = torch.randn(12, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = KoLeoLoss()(feats)
        dino = DINOLoss(33)([feats], [F.softmax(feats, -1)])
    assert inside.dtype == dino.dtype == torch.float32
    torch.testing.assert_close(inside, KoLeoLoss()(feats))
    torch.testing.assert_close(dino, DINOLoss(33)([feats], [F.softmax(feats, -1)]))


# ---- errors -------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    dino, ibot = DINOLoss(8), iBOTPatchLoss(8)
    s, t = torch.randn(4, 8), F.softmax(torch.randn(4, 8), -1)
    with pytest.raises(ValueError, match="K = 8"):
        dino([torch.randn(4, 9)], [t])
    with pytest.raises(ValueError, match="must match"):
        dino([s], [t[:3]])
    with pytest.raises(ValueError, match="at least one"):
        dino([], [t])
    with pytest.raises(ValueError, match="at least one"):
        dino([s], [])
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(8, student_temp=0)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino.softmax_center_teacher(s, -0.1)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino.sinkhorn_knopp_teacher(s, 0.0)
    with pytest.raises(ValueError, match="center_momentum"):
        iBOTPatchLoss(8, center_momentum=1.5)
    with pytest.raises(ValueError, match="out_dim"):
        DINOLoss(0)
    with pytest.raises(ValueError, match="K = 8"):
        dino.update_center(torch.randn(4, 7))
    with pytest.raises(TypeError, match="floating"):
        dino.softmax_center_teacher(torch.ones(4, 8, dtype=torch.long), 0.1)
    masks = torch.zeros(2, 5, dtype=torch.bool)
    masks[0, :4] = True
    with pytest.raises(TypeError, match="bool"):
        ibot.forward_masked(s, t, masks.float())
    with pytest.raises(ValueError, match="same shape"):
        ibot.forward_masked(s, t[:3], masks)
    with pytest.raises(ValueError, match="one weight per"):
        ibot.forward_masked(s, t, masks, masks_weight=torch.ones(3))
    with pytest.raises(ValueError, match="one weight per"):
        ibot.forward_masked(s[:3], t[:3], masks)  # 4 masked tokens, 3 rows
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 8))
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(8))


# ---- distributed --------------------------------------------------------------------------------


def test_distributed_reductions_equal_one_process(tmp_path):
    """2 gloo processes, each with its share of the rows, give the one-process result on all."""
    out = tmp_path / "result.json"
    torchrun("train_losses_worker.py", 2, str(out), timeout=240)
    ranks = [load_result(f"{out}.rank{r}") for r in range(2)]
    data = worker_data()

    def cat(key):
        return torch.cat([torch.tensor(r[key], dtype=torch.float64) for r in ranks])

    def same_on_ranks(key):
        a, b = (torch.tensor(r[key], dtype=torch.float64) for r in ranks)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        return a

    single = DINOLoss(K)
    torch.testing.assert_close(
        cat("dino_sk"), single.sinkhorn_knopp_teacher(data["dino_sk"], TEMP).double()
    )
    assert_close_to_reference(cat("dino_sk").float(), ref_sinkhorn(data["dino_sk"], TEMP), "sk", 4)
    large = single.sinkhorn_knopp_teacher(data["dino_sk"] + 100, TEMP).double()
    assert torch.isfinite(large).all()
    torch.testing.assert_close(cat("dino_sk_large"), large)

    for step in data["dino_steps"]:
        probs = single.softmax_center_teacher(step, TEMP)
        single.update_center(step)
    torch.testing.assert_close(cat("dino_probs"), probs.double())
    torch.testing.assert_close(same_on_ranks("dino_center"), single.state_dict()["center"].double())

    expected = 0.1 * data["dino_unequal"].double().mean(0, keepdim=True)  # the global mean
    torch.testing.assert_close(same_on_ranks("dino_center_unequal"), expected)

    counts = sum(IBOT_SPLIT)
    ibot = iBOTPatchLoss(K)
    expected = ibot.sinkhorn_knopp_teacher(data["ibot_sk"], TEMP, counts).double()
    torch.testing.assert_close(cat("ibot_sk"), expected)
    assert [r["ibot_count_after"] for r in ranks] == [[IBOT_SPLIT[0]], [IBOT_SPLIT[1]]]

    for step in data["ibot_steps"]:
        probs = ibot.softmax_center_teacher(step[None], TEMP)
        ibot.update_center(step[None])
    torch.testing.assert_close(
        torch.cat([torch.tensor(r["ibot_probs"], dtype=torch.float64) for r in ranks], dim=1),
        probs.double(),
    )
    torch.testing.assert_close(same_on_ranks("ibot_center"), ibot.state_dict()["center"].double())

    halves = data["ibot_unequal"].double().split(IBOT_SPLIT)  # DINOv2: the mean of rank means
    expected = 0.1 * (halves[0].mean(0) + halves[1].mean(0)) / 2
    torch.testing.assert_close(same_on_ranks("ibot_center_unequal").reshape(-1), expected)


# ---- schedules ----------------------------------------------------------------------------------


def test_cosine_scheduler_hand_values():
    sched = CosineScheduler(
        1.0, 0.0, total_iters=10, warmup_iters=2, start_warmup_value=0.5, freeze_iters=3
    )
    cosine = [0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    expected = [0.0, 0.0, 0.0, 0.5, 1.0, *cosine]
    assert len(sched) == 10
    assert list(sched) == pytest.approx(expected, abs=1e-15)
    assert [sched[i] for i in range(10)] == pytest.approx(expected, abs=1e-15)
    assert sched[10] == sched[10**6] == 0.0
    assert isinstance(sched[4], float)
    assert CosineScheduler(2.0, 2.0, 0)[0] == 2.0
    with pytest.raises(ValueError, match="must not exceed"):
        CosineScheduler(1.0, 0.0, total_iters=3, warmup_iters=2, freeze_iters=2)
    with pytest.raises(ValueError, match="int >= 0"):
        sched[-1]


def _schedule_config(**optim):
    return {
        "train": {"OFFICIAL_EPOCH_LENGTH": 10, "batch_size_per_gpu": 64},
        "optim": {
            "epochs": 5,
            "warmup_epochs": 1,
            "base_lr": 0.004,
            "min_lr": 1e-6,
            "weight_decay": 0.04,
            "weight_decay_end": 0.4,
            "freeze_last_layer_epochs": 1,
            "scaling_rule": "sqrt_wrt_1024",
            **optim,
        },
        "teacher": {
            "momentum_teacher": 0.992,
            "final_momentum_teacher": 1.0,
            "warmup_teacher_temp": 0.04,
            "teacher_temp": 0.07,
            "warmup_teacher_temp_epochs": 3,
        },
    }


def test_build_schedules_hand_values():
    s = build_schedules(_schedule_config(), world_size=4)
    lr = 0.004 * math.sqrt(64 * 4 / 1024)
    assert s.total_iters == 50
    assert s.lr[0] == 0.0 and s.lr[9] == pytest.approx(lr) and s.lr[10] == pytest.approx(lr)
    assert s.lr[5] == pytest.approx(lr * 5 / 9)
    assert s.lr[49] == pytest.approx(1e-6 + 0.5 * (lr - 1e-6) * (1 + math.cos(math.pi * 39 / 40)))
    assert s.lr[50] == s.lr[999] == 1e-6
    assert [s.last_layer_lr[i] for i in range(10)] == [0.0] * 10
    assert [s.last_layer_lr[i] for i in range(10, 60)] == [s.lr[i] for i in range(10, 60)]
    assert s.wd[0] == pytest.approx(0.04) and s.wd[25] == pytest.approx(0.22) and s.wd[50] == 0.4
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[50] == 1.0
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[29] == pytest.approx(0.07)
    assert s.teacher_temp[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert s.teacher_temp[30] == s.teacher_temp[49] == 0.07
    values = s.at(10)
    assert (values.lr, values.wd, values.momentum, values.teacher_temp, values.last_layer_lr) == (
        s.lr[10],
        s.wd[10],
        s.momentum[10],
        s.teacher_temp[10],
        s.last_layer_lr[10],
    )
    assert build_schedules(_schedule_config(), lr=0.25).lr[9] == pytest.approx(0.25)
    assert build_schedules(_schedule_config(lr=0.5)).lr[9] == pytest.approx(0.5)
    assert build_schedules(_schedule_config(scaling_rule="none")).lr[9] == pytest.approx(0.004)
    assert build_schedules(_schedule_config()).lr[9] == pytest.approx(0.004 / 4)  # world 1
    assert scaled_lr(0.004, 2048) == pytest.approx(0.004 * math.sqrt(2))
    config = _schedule_config()
    del config["optim"]["min_lr"]
    with pytest.raises(ValueError, match="optim.min_lr"):
        build_schedules(config)
    with pytest.raises(ValueError, match="scaling_rule"):
        build_schedules(_schedule_config(scaling_rule="linear"))


# ---- parameter groups ---------------------------------------------------------------------------

DECAY, PATCH_MULT, DEPTH = 0.5, 0.2, 4


def _backbone(block_chunks: int) -> models.DinoVisionTransformer:
    return models.DinoVisionTransformer(
        img_size=16,
        patch_size=4,
        embed_dim=16,
        depth=DEPTH,
        num_heads=2,
        block_chunks=block_chunks,
        init_values=1e-5,
        num_register_tokens=2,
        backend="torch",
    )


def _expected(name: str, n_blocks: int) -> tuple[float, float, bool]:
    """DINOv2's rules, written out: (lr_multiplier, wd_multiplier, is_last_layer)."""
    flat = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", name) if n_blocks else name
    if not n_blocks:
        lr = 1.0
    elif flat.split(".")[0] in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
        lr = DECAY ** (n_blocks + 1)
    elif flat.startswith("patch_embed."):
        lr = DECAY ** (n_blocks + 1) * PATCH_MULT
    elif flat.startswith("blocks."):
        lr = DECAY ** (n_blocks - int(flat.split(".")[1]))
    else:
        lr = 1.0
    no_wd = name.endswith(".bias") or ".norm" in f".{name}" or name.endswith(".gamma")
    return lr, 0.0 if no_wd else 1.0, name.startswith("last_layer.")


@pytest.mark.parametrize("block_chunks", [0, 2])
def test_param_groups_follow_dinov2_rules(block_chunks):
    backbone = _backbone(block_chunks)
    head = models.DINOHead(16, 32, hidden_dim=8, bottleneck_dim=8)
    for model, n_blocks in ((backbone, DEPTH), (head, 0)):
        groups = get_params_groups_with_decay(model, DECAY, PATCH_MULT)
        names = [n for n, p in model.named_parameters()]
        assert [g["name"] for g in groups] == names
        for g in groups:
            got = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
            assert got == pytest.approx(_expected(g["name"], n_blocks)), g["name"]
    chunked = {g["name"]: g["lr_multiplier"] for g in get_params_groups_with_decay(backbone, DECAY)}
    assert chunked["norm.weight"] == 1.0 and chunked["cls_token"] == DECAY**5


def test_param_groups_ignore_wrappers_and_frozen_params():
    plain = _backbone(2)
    wrapped = _backbone(2)
    for chunk in wrapped.blocks:
        for i, block in enumerate(chunk):
            if not isinstance(block, torch.nn.Identity):
                chunk[i] = checkpoint_wrapper(block)
    wrapped.mask_token.requires_grad_(False)
    strip = lambda groups: [  # noqa: E731
        (g["name"], g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups
    ]
    expected = strip(get_params_groups_with_decay(plain, DECAY, PATCH_MULT))
    expected = [g for g in expected if g[0] != "mask_token"]
    assert strip(get_params_groups_with_decay(wrapped, DECAY, PATCH_MULT)) == expected

    class Container(torch.nn.Module):  # no n_blocks: counted from the names
        def __init__(self):
            super().__init__()
            self._orig_mod = _backbone(0)

    counted = strip(get_params_groups_with_decay(Container(), DECAY, PATCH_MULT))
    assert counted == strip(get_params_groups_with_decay(_backbone(0), DECAY, PATCH_MULT))


def test_fused_groups_and_apply_optim_scheduler():
    backbone = _backbone(0)
    head = models.DINOHead(16, 32, hidden_dim=8, bottleneck_dim=8)
    groups = []
    for part in (backbone, head):
        groups += fuse_params_groups(get_params_groups_with_decay(part, DECAY, PATCH_MULT))
    # backbone: tokens, patch_embed weight / bias, 4 blocks × (decay, no decay), final norm;
    # head: mlp weights, mlp biases, last layer
    assert len(groups) == 1 + 2 + 2 * DEPTH + 1 + 3
    params = [p for g in groups for p in g["params"]]
    assert (
        len(params)
        == len({id(p) for p in params})
        == len(list(backbone.parameters()) + list(head.parameters()))
    )
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups[:12]]
    assert len(set(keys)) == len(keys)
    optimizer = torch.optim.AdamW(groups)
    apply_optim_scheduler(optimizer, lr=0.1, wd=0.05, last_layer_lr=0.0)
    last = [g for g in optimizer.param_groups if g["is_last_layer"]]
    assert len(last) == 1 and last[0]["lr"] == 0.0 and last[0]["weight_decay"] == 0.05
    for g in optimizer.param_groups:
        if not g["is_last_layer"]:
            assert g["lr"] == pytest.approx(0.1 * g["lr_multiplier"])
            assert g["weight_decay"] == pytest.approx(0.05 * g["wd_multiplier"])
    before = head.last_layer.weight_v.detach().clone()
    out = head(backbone(torch.randn(2, 3, 16, 16)))
    out.square().mean().backward()
    optimizer.step()
    torch.testing.assert_close(head.last_layer.weight_v, before)  # frozen by its lr of 0


@pytest.mark.parametrize("loss_class", [DINOLoss, iBOTPatchLoss])
def test_update_center_from_mean_equals_update_center(loss_class):
    """The fused op returns only the mean of the teacher logits over the rows: the center update
    from it equals the update from the logits."""
    logits = [torch.randn(9, 13, dtype=torch.float64) for _ in range(3)]
    from_logits, from_mean = loss_class(13), loss_class(13)
    for step in logits:
        from_logits.update_center(step)
        from_mean.update_center_from_mean(step.mean(dim=0), len(step))
    from_logits.apply_center_update()
    from_mean.apply_center_update()
    torch.testing.assert_close(from_mean.center, from_logits.center.to(from_mean.center.dtype))
    with pytest.raises(ValueError, match="13 prototypes"):
        from_mean.update_center_from_mean(torch.zeros(12), 3)
