"""DINOv2's student/teacher model and its training step, in two implementations of one method.

``impl="fast"``: our backbones (fused attention and LayerNorm kernels, subset stochastic depth,
fused residual updates); the student runs all crops in one packed pass
(``forward_features_list``) and its heads in one call on all the tokens they take.
``impl="baseline"``: stock PyTorch the way the iBOT code ran it (:mod:`.baseline`: explicit
attention, ``torch.nn.LayerNorm``, per-sample mask drop path) with one forward per crop resolution
and one head call per input. The losses, schedules and data are the same; so are the parameter
names, so both load the same weights. With drop path 0 the two compute the same losses.

The step (``forward_backward``) follows DINOv2's: the teacher (global crops, no drop path) gives the
CLS targets, swapped between the two views, and the targets of the masked patch tokens; centering
or Sinkhorn-Knopp; DINO loss of every student crop against the other view's teacher output (local
crops against both), iBOT loss on the masked tokens, KoLeo on the student's global CLS tokens.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import torch
from torch import nn

from dinov2_fast import _backend, models
from dinov2_fast.fsdp import clip_grad_norm_, ema_update_
from dinov2_fast.train import baseline
from dinov2_fast.train.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss

__all__ = ["IMPLS", "SSLMetaArch", "build_backbone"]

# fast: ours. baseline: the iBOT code's way (explicit attention). stock: the baseline with SDPA
# attention, the best of stock PyTorch (the benchmark runs it under torch.compile).
IMPLS = ("fast", "baseline", "stock")
_ARCHS = {
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def build_backbone(cfg, impl: str, *, drop_path: bool) -> models.DinoVisionTransformer:
    """The backbone of ``cfg.student`` (DINOv2's keys: arch, patch_size, layerscale, ...) for
    ``impl``; the teacher's has ``drop_path=False``. ``arch: custom`` takes embed_dim, depth and
    num_heads from the config."""
    student = cfg.student
    if student.arch == "custom":
        dims = (student.embed_dim, student.depth, student.num_heads)
        if None in dims:
            raise ValueError("student.arch=custom needs student.embed_dim, depth and num_heads")
    elif student.arch in _ARCHS:
        dims = _ARCHS[student.arch]
    else:
        raise ValueError(
            f"student.arch must be one of {', '.join([*_ARCHS, 'custom'])}, got {student.arch!r}"
        )
    embed_dim, depth, num_heads = dims
    kwargs: dict[str, Any] = dict(
        img_size=cfg.crops.global_crops_size,
        patch_size=student.patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=student.qkv_bias,
        ffn_bias=student.ffn_bias,
        proj_bias=student.proj_bias,
        drop_path_rate=student.drop_path_rate if drop_path else 0.0,
        drop_path_uniform=student.drop_path_uniform,
        init_values=student.layerscale,
        ffn_layer=student.ffn_layer,
        block_chunks=student.block_chunks,
        num_register_tokens=student.num_register_tokens,
        interpolate_antialias=student.interpolate_antialias,
        interpolate_offset=student.interpolate_offset,
    )
    if _check_impl(impl) == "fast":
        return models.DinoVisionTransformer(**kwargs, backend=cfg.compute.backend)
    block_fn = baseline.Block if impl == "baseline" else baseline.StockBlock
    return models.DinoVisionTransformer(
        **kwargs, block_fn=block_fn, norm_layer=partial(nn.LayerNorm, eps=1e-6)
    )


def _head(cfg_head, in_dim: int) -> models.DINOHead:
    return models.DINOHead(
        in_dim,
        cfg_head.head_n_prototypes,
        nlayers=cfg_head.head_nlayers,
        hidden_dim=cfg_head.head_hidden_dim,
        bottleneck_dim=cfg_head.head_bottleneck_dim,
    )


class SSLMetaArch(nn.Module):
    """``student`` and ``teacher``: ModuleDicts of ``backbone``, ``dino_head`` and (with
    ``ibot.separate_head``) ``ibot_head``, alike in structure and initial weights; the teacher
    takes no gradients and moves by EMA (:meth:`update_teacher`). The losses' centers are buffers
    of this module, so checkpoints of it carry them."""

    def __init__(self, cfg, impl: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.impl = _check_impl(impl or cfg.compute.impl)
        if cfg.train.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(
                f"train.centering must be centering or sinkhorn_knopp, got {cfg.train.centering!r}"
            )
        student = nn.ModuleDict({"backbone": build_backbone(cfg, self.impl, drop_path=True)})
        teacher = nn.ModuleDict({"backbone": build_backbone(cfg, self.impl, drop_path=False)})
        embed_dim = student.backbone.embed_dim
        student["dino_head"] = _head(cfg.dino, embed_dim)
        if cfg.ibot.separate_head:
            student["ibot_head"] = _head(cfg.ibot, embed_dim)
        for name in student:
            if name != "backbone":
                teacher[name] = copy.deepcopy(student[name])
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        self.student, self.teacher = student, teacher
        ibot_prototypes = (cfg.ibot if cfg.ibot.separate_head else cfg.dino).head_n_prototypes
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> SSLMetaArch:
        """The student trains; the teacher always runs in eval mode (no drop path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # --- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def _teacher_targets(self, batch: dict[str, Any], teacher_temp: float):
        global_crops = batch["collated_global_crops"]
        n_images = global_crops.shape[0] // 2
        mask_indices = batch["mask_indices_list"]
        out = self.teacher.backbone(global_crops, is_training=True)
        cls = out["x_norm_clstoken"]
        cls = torch.cat(cls.chunk(2)[::-1])  # each view's target comes from the other view
        masked = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        if self.cfg.ibot.separate_head:
            cls_logits = self.teacher.dino_head(cls)
            masked_logits = self.teacher.ibot_head(masked)
        else:
            logits = self.teacher.dino_head(torch.cat([cls, masked]))
            cls_logits, masked_logits = logits[: len(cls)], logits[len(cls) :]
        cls_logits, masked_logits = cls_logits.float(), masked_logits.float()
        if self.cfg.train.centering == "centering":
            dino_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            ibot_probs = self.ibot_patch_loss.softmax_center_teacher(
                masked_logits[None], teacher_temp
            )[0]
            self.ibot_patch_loss.update_center(masked_logits[None])
        else:
            dino_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            ibot_probs = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                masked_logits, teacher_temp, batch["n_masked_patches"]
            )
        for part in self.teacher.values():  # sharded: free the gathered weights (no backward)
            if hasattr(part, "reshard"):
                part.reshard()
        return dino_probs.view(2, n_images, -1), ibot_probs

    def _student_features(self, batch: dict[str, Any]):
        """(global CLS [2B, D], local CLS [nB, D], masked patch tokens [M, D])."""
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        masks = batch["collated_masks"]
        backbone = self.student.backbone
        has_local = local_crops.shape[0] > 0
        if self.impl == "fast" and has_local:
            outs = backbone([global_crops, local_crops], masks=[masks, None], is_training=True)
            global_out, local_cls = outs[0], outs[1]["x_norm_clstoken"]
        else:  # one forward per crop resolution, as the iBOT code ran it
            global_out = backbone(global_crops, masks=masks, is_training=True)
            local_cls = global_out["x_norm_clstoken"][:0]
            if has_local:
                local_cls = backbone(local_crops, is_training=True)["x_norm_clstoken"]
        patches = global_out["x_norm_patchtokens"].flatten(0, 1)
        masked = patches.index_select(0, batch["mask_indices_list"])
        return global_out["x_norm_clstoken"], local_cls, masked

    def _student_logits(self, global_cls, local_cls, masked):
        heads = self.student
        separate = self.cfg.ibot.separate_head
        if self.impl == "fast":  # one head call on everything it takes
            inputs = [local_cls, global_cls] + ([] if separate else [masked])
            logits = heads.dino_head(torch.cat(inputs)).split([len(t) for t in inputs])
            local_logits, global_logits = logits[0], logits[1]
            masked_logits = heads.ibot_head(masked) if separate else logits[2]
        else:
            local_logits = heads.dino_head(local_cls)
            global_logits = heads.dino_head(global_cls)
            masked_logits = (heads.ibot_head if separate else heads.dino_head)(masked)
        return local_logits.float(), global_logits.float(), masked_logits.float()

    def forward_backward(
        self, batch: dict[str, Any], teacher_temp: float
    ) -> dict[str, torch.Tensor]:
        """One step's losses (DINOv2's weighting), back-propagated; returns them detached, with
        ``total_loss``. ``fast`` computes the DINO and iBOT losses with the fused
        ``ops.prototype_cross_entropy`` (no rows x prototypes logits); the others as DINOv2."""
        cfg = self.cfg
        # DINOv2's normalisation: 2 global terms (each view against the other) + 2 per local crop.
        n_terms = 2 + max(cfg.crops.local_crops_number * 2, 1)
        if self.impl == "fast":
            teacher = self._teacher_head_features(batch)
            global_cls, local_cls, masked = self._student_features(batch)
            losses = self._fused_head_losses(
                batch, teacher, global_cls, local_cls, masked, teacher_temp, n_terms
            )
        else:
            dino_probs, ibot_probs = self._teacher_targets(batch, teacher_temp)
            global_cls, local_cls, masked = self._student_features(batch)
            losses = self._head_losses(
                batch, dino_probs, ibot_probs, global_cls, local_cls, masked, n_terms
            )
        if cfg.dino.koleo_loss_weight > 0:
            koleo = sum(self.koleo_loss(view.float()) for view in global_cls.chunk(2))
            losses["koleo_loss"] = cfg.dino.koleo_loss_weight * koleo
        total = sum(
            losses[name] * weight
            for name, weight in (
                ("dino_local_crops_loss", cfg.dino.loss_weight),
                ("dino_global_crops_loss", cfg.dino.loss_weight),
                ("koleo_loss", 1.0),
                ("ibot_loss", cfg.ibot.loss_weight),
            )
            if name in losses
        )
        total.backward()
        losses["total_loss"] = total
        return {name: value.detach() for name, value in losses.items()}

    def _head_losses(self, batch, dino_probs, ibot_probs, global_cls, local_cls, masked, n_terms):
        """The DINO and iBOT losses on materialised logits, as DINOv2 computes them."""
        n_local = self.cfg.crops.local_crops_number
        local_logits, global_logits, masked_logits = self._student_logits(
            global_cls, local_cls, masked
        )
        losses: dict[str, torch.Tensor] = {}
        if n_local > 0:
            local = self.dino_loss(list(local_logits.chunk(n_local)), list(dino_probs))
            losses["dino_local_crops_loss"] = local / n_terms
        global_term = self.dino_loss([global_logits], [dino_probs.flatten(0, 1)])
        losses["dino_global_crops_loss"] = global_term * 2 / n_terms
        losses["ibot_loss"] = self.ibot_patch_loss.forward_masked(
            masked_logits,
            ibot_probs,
            student_masks_flat=batch["collated_masks"],
            n_masked_patches=batch["n_masked_patches"],
            masks_weight=batch["masks_weight"],
        )
        return losses

    # --- the fused path (impl="fast") ------------------------------------------------------------

    @torch.no_grad()
    def _teacher_head_features(self, batch: dict[str, Any]):
        """The teacher's bottleneck features (normalised, before the prototype layer) of the
        swapped CLS tokens [2B, F] and of the masked patch tokens [M, F], and its heads' prototype
        weights (computed in the heads' forward, where FSDP has gathered them)."""
        teacher = self.teacher
        out = teacher.backbone(batch["collated_global_crops"], is_training=True)
        cls = out["x_norm_clstoken"]
        cls = torch.cat(cls.chunk(2)[::-1])  # each view's target comes from the other view
        patches = out["x_norm_patchtokens"].flatten(0, 1)
        masked = patches.index_select(0, batch["mask_indices_list"])
        if self.cfg.ibot.separate_head:
            cls_features, dino_weight = teacher.dino_head(cls, return_features=True)
            masked_features, ibot_weight = teacher.ibot_head(masked, return_features=True)
        else:
            features, dino_weight = teacher.dino_head(
                torch.cat([cls, masked]), return_features=True
            )
            cls_features, masked_features = features[: len(cls)], features[len(cls) :]
            ibot_weight = dino_weight
        for part in teacher.values():  # sharded: free the gathered weights (no backward)
            if hasattr(part, "reshard"):
                part.reshard()
        return cls_features, masked_features, dino_weight, ibot_weight

    def _fused_head_losses(
        self, batch, teacher, global_cls, local_cls, masked, teacher_temp, n_terms
    ):
        """The DINO and iBOT losses through ``ops.prototype_cross_entropy``: each student row
        against its teacher row, weighted as DINOv2 averages them. The DINO loss pairs every
        local crop with both teacher views and each global crop with the other view."""
        from dinov2_fast.ops import prototype_cross_entropy

        cfg = self.cfg
        n_local = cfg.crops.local_crops_number
        teacher_cls, teacher_masked, teacher_dino_weight, teacher_ibot_weight = teacher
        heads = self.student
        separate = cfg.ibot.separate_head
        inputs = [local_cls, global_cls] + ([] if separate else [masked])
        features, dino_weight = heads.dino_head(torch.cat(inputs), return_features=True)
        features = features.split([len(t) for t in inputs])
        local_features, global_features = features[0], features[1]
        ibot_weight = dino_weight
        if separate:
            masked_features, ibot_weight = heads.ibot_head(masked, return_features=True)
        else:
            masked_features = features[2]
        # The op takes one dtype: under autocast its dtype (the normalisation computes in fp32,
        # the prototype matmul in bf16 as DINOv2's last layer under autocast), else the features'.
        device_type = global_features.device.type
        dtype = global_features.dtype
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)

        sinkhorn = cfg.train.centering == "sinkhorn_knopp"
        iterations = 3 if sinkhorn else 0
        # compute.backend names the kernels of the whole model; where the loss has none of that
        # backend (no CUDA kernel), "auto" picks its kernel rather than the step failing.
        loss_backend = cfg.compute.backend
        if loss_backend not in _backend.AUTO_PREFERENCE["prototype_cross_entropy"]:
            loss_backend = "auto"

        def loss(student, student_weight, target, target_weight, criterion, row_weight):
            center = None
            if not sinkhorn:
                criterion.apply_center_update()
                center = criterion.center.reshape(-1)
            return prototype_cross_entropy(
                student.to(dtype),
                student_weight.to(dtype),
                target.to(dtype),
                target_weight.detach().to(dtype),
                student_temp=criterion.student_temp,
                teacher_temp=teacher_temp,
                center=center,
                sinkhorn_iters=iterations,
                row_weight=row_weight,
                backend=loss_backend,
            )

        n_images = global_features.shape[0] // 2
        weight = 1.0 / (n_images * n_terms)  # DINOv2: mean over rows, summed over pairs / n_terms
        losses: dict[str, torch.Tensor] = {}
        dino = (dino_weight, teacher_dino_weight, self.dino_loss)
        if n_local > 0:
            views = teacher_cls.view(2, n_images, -1)
            chunks = local_features.chunk(n_local)
            student_rows = torch.cat([chunk for chunk in chunks for _ in range(2)])
            teacher_rows = torch.cat([views[v] for _ in chunks for v in range(2)])
            rows_weight = student_rows.new_full((len(student_rows),), weight, dtype=torch.float32)
            losses["dino_local_crops_loss"], _ = loss(
                student_rows, dino[0], teacher_rows, dino[1], dino[2], rows_weight
            )
        rows_weight = global_features.new_full((len(global_features),), weight, dtype=torch.float32)
        losses["dino_global_crops_loss"], dino_mean = loss(
            global_features, dino[0], teacher_cls, dino[1], dino[2], rows_weight
        )
        if not sinkhorn:
            self.dino_loss.update_center_from_mean(dino_mean, len(teacher_cls))

        masks_weight = batch["masks_weight"].float() / batch["collated_masks"].shape[0]
        losses["ibot_loss"], ibot_mean = loss(
            masked_features,
            ibot_weight,
            teacher_masked,
            teacher_ibot_weight,
            self.ibot_patch_loss,
            masks_weight,
        )
        if not sinkhorn:
            self.ibot_patch_loss.update_center_from_mean(ibot_mean, len(teacher_masked))
        return losses

    # --- after the backward ----------------------------------------------------------------------

    def clip_gradients(self, max_norm: float) -> dict[str, torch.Tensor]:
        """DINOv2 clips each student part (backbone, heads) by its own norm; returns the norms."""
        return {
            name: clip_grad_norm_(module.parameters(), max_norm)
            for name, module in self.student.items()
        }

    def update_teacher(self, momentum: float) -> None:
        ema_update_(self.teacher, self.student, momentum)
