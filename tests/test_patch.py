"""dinov2_fast.patch on timm's VisionTransformer (small, base, registers, SwiGLU) and on a model of
DINOv2's layout (tests/dinov2_reference.py): patched and unpatched agree in eval and in training
(the same drop-path samples), gradients included; the state_dict, hooks and classes survive;
patching twice is a no-op and unpatch restores; torch.compile traces the patched model whole."""

from __future__ import annotations

import copy

import pytest
import torch
from dinov2_reference import RefDinoVisionTransformer, RefNestedBlock
from reference import randomize_weights
from torch import nn

from dinov2_fast import _backend, models, patch, unpatch
from dinov2_fast.patch import PatchReport

timm = pytest.importorskip("timm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMG = 42  # 3 x 3 patches of 14 pixels
BACKEND = "triton" if not _backend.unavailable_reason("triton", torch.device(DEVICE)) else "torch"

TIMM_VARIANTS = {
    "small": ("vit_small_patch14_dinov2", {}),
    "base": ("vit_base_patch14_dinov2", {}),
    "reg4": ("vit_small_patch14_reg4_dinov2", {}),
    "swiglu": (  # DINOv2's giant MLP in timm: a packed SwiGLU, here at ViT-S width
        "vit_small_patch14_dinov2",
        {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU, "mlp_ratio": 2.66667 * 2},
    ),
}


def _timm_model(variant: str, drop_path_rate: float = 0.0, depth: int = 2, **kwargs) -> nn.Module:
    name, extra = TIMM_VARIANTS[variant]
    model = timm.create_model(
        name,
        pretrained=False,
        img_size=IMG,
        depth=depth,
        drop_path_rate=drop_path_rate,
        **{**extra, **kwargs},
    )
    return randomize_weights(model).to(DEVICE)


class _SubsetDropPath(nn.Module):
    """timm's drop path replaced by DINOv2's draw (``randperm(B)[:k]`` kept, scaled by B / k) as a
    mask, so that the unpatched model drops the samples the patched one skips."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        batch = x.shape[0]
        kept = max(int(batch * (1 - self.rate)), 1)
        mask = torch.zeros(batch, device=x.device, dtype=x.dtype)
        mask[torch.randperm(batch, device=x.device)[:kept]] = batch / kept
        return x * mask.view(-1, *([1] * (x.dim() - 1)))


def _with_subset_drop_path(model: nn.Module) -> nn.Module:
    for block in model.blocks:
        rate = getattr(block.drop_path1, "drop_prob", 0.0)
        if rate > 0.1:  # the patched block's subset form; below it keeps the module's own mask
            block.drop_path1 = _SubsetDropPath(rate)
            block.drop_path2 = _SubsetDropPath(rate)
    return model


def _run(model, inputs, seed, train, apply, grad_output=None):
    """``apply(model, inputs)`` under ``seed`` in the model's dtype; with ``train``, also the
    parameter gradients for ``grad_output``."""
    model.train(train)
    dtype = next(model.parameters()).dtype
    inputs = [x.to(dtype) for x in inputs]
    torch.manual_seed(seed)
    if not train:
        with torch.no_grad():
            return apply(model, inputs), {}
    model.zero_grad()
    out = apply(model, inputs)
    out.backward(grad_output.to(out.dtype))
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _timm_apply(model, inputs):
    return model(inputs[0])


def _assert_as_close_as_stock(name, ours, stock, reference, slack=2.0):
    """``ours`` (patched) is as close to the float64 ``reference`` as the unpatched model in the
    same dtype (``stock``) is, within a small multiple: the same dtype tolerance."""
    assert ours.shape == reference.shape, name
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    scale = max(reference.abs().max().item(), 1.0)
    floor = 8 * torch.finfo(ours.dtype).eps * scale
    error = (ours.double() - reference).abs().max().item()
    stock_error = (stock.double() - reference).abs().max().item()
    assert error <= slack * stock_error + floor, (
        f"{name}: patched error {error:.3g}, unpatched {stock_error:.3g} (floor {floor:.3g})"
    )


def _compare(model_fn, train, seed=0, dtype=torch.float32, prepare=lambda m: m, **options):
    """The patched model in ``dtype`` against the unpatched one in ``dtype`` and in float64."""
    apply = options.get("apply", _timm_apply)
    inputs = options.get("inputs") or [torch.randn(5, 3, IMG, IMG, device=DEVICE)]
    stock = model_fn()
    patched = copy.deepcopy(stock)
    report = patch(patched, backend=BACKEND)
    assert not report.left, str(report)
    reference = prepare(copy.deepcopy(stock)).double()
    stock = prepare(stock).to(dtype)
    patched = patched.to(dtype)
    grad = torch.randn_like(_run(reference, inputs, seed, False, apply)[0])
    results = [_run(m, inputs, seed, train, apply, grad) for m in (patched, stock, reference)]
    (out, grads), (stock_out, stock_grads), (ref_out, ref_grads) = results
    _assert_as_close_as_stock("output", out, stock_out, ref_out)
    assert grads.keys() == stock_grads.keys() == ref_grads.keys()
    for name in grads:
        _assert_as_close_as_stock(f"d{name}", grads[name], stock_grads[name], ref_grads[name])
    return report


# --- timm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timm_eval_matches_unpatched(variant, dtype):
    report = _compare(lambda: _timm_model(variant), train=False, dtype=dtype)
    counts = report.counts()["replaced"]
    assert counts == {"layer_norm": 5, "attention": 2, "block": 2}, str(report)


@pytest.mark.parametrize(
    "variant, drop_path_rate",
    [("small", 0.0), ("small", 0.05), ("small", 0.4), ("base", 0.4), ("reg4", 0.4)]
    + [("swiglu", 0.05), ("swiglu", 0.4)],
)
def test_timm_training_matches_unpatched(variant, drop_path_rate):
    """Forward and backward in training; with drop path the unpatched model drops the same
    samples (timm's own mask at p <= 0.1, DINOv2's subset draw above)."""
    _compare(
        lambda: _timm_model(variant, drop_path_rate, depth=3),
        train=True,
        seed=7,
        prepare=_with_subset_drop_path,
    )


def test_from_timm_takes_a_patched_timm_model():
    model = _timm_model("reg4").eval()
    patch(model, backend=BACKEND)
    ours = models.from_timm(model).to(DEVICE).eval()
    images = torch.randn(2, 3, IMG, IMG, device=DEVICE)
    with torch.no_grad():
        expected = model.forward_features(images)[:, 0]
        torch.testing.assert_close(ours(images), expected, rtol=1e-4, atol=1e-4)


def test_timm_block_with_a_mask_runs_its_own_forward():
    block = _timm_model("small").blocks[0]
    stock = copy.deepcopy(block)
    patch(block, backend=BACKEND)
    x = torch.randn(2, 10, 384, device=DEVICE)
    mask = torch.rand(2, 1, 10, 10, device=DEVICE) > 0.3
    mask[..., 0] = True
    with torch.no_grad():
        torch.testing.assert_close(block(x, attn_mask=mask), stock(x, attn_mask=mask))
        torch.testing.assert_close(block(x, None), stock(x), rtol=1e-4, atol=1e-4)


def test_timm_attention_dropout_in_training_runs_its_own_forward():
    model = _timm_model("small", attn_drop_rate=0.5)
    stock = copy.deepcopy(model)
    patch(model, backend=BACKEND)
    images = torch.randn(2, 3, IMG, IMG, device=DEVICE)
    for train in (True, False):
        model.train(train)
        stock.train(train)
        torch.manual_seed(3)
        out = model(images)
        torch.manual_seed(3)
        torch.testing.assert_close(out, stock(images), rtol=1e-4, atol=1e-4)


def test_patched_timm_blocks_take_packed_crop_lists():
    model = _timm_model("small", depth=1)
    patch(model, backend=BACKEND)
    block = model.blocks[0].eval()
    groups = [torch.randn(2, 10, 384, device=DEVICE), torch.randn(3, 5, 384, device=DEVICE)]
    with torch.no_grad():
        packed = block(groups)
        for out, group in zip(packed, groups):
            torch.testing.assert_close(out, block(group), rtol=1e-4, atol=1e-4)
    unpatched_attention = _timm_model("small", depth=1)
    patch(unpatched_attention, attention=False)
    with pytest.raises(TypeError, match="attention patched"):
        unpatched_attention.blocks[0](groups)


# --- the patch mechanics --------------------------------------------------------------------------


def test_state_dict_parameters_and_hooks_are_unchanged():
    model = _timm_model("reg4")
    before = model.state_dict()
    params = {name: p for name, p in model.named_parameters()}
    calls = []
    model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    patch(model, backend=BACKEND)
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert after[key] is before[key] or after[key].data_ptr() == before[key].data_ptr(), key
    assert all(p is params[name] for name, p in model.named_parameters())
    model.eval()(torch.randn(1, 3, IMG, IMG, device=DEVICE))
    assert calls == [1]
    # A state_dict of the patched model loads strictly into an unpatched one, and back.
    fresh = _timm_model("reg4")
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(fresh.state_dict(), strict=True)


def test_patch_twice_is_a_no_op_and_unpatch_restores():
    model = _timm_model("small")
    classes = {name: type(m) for name, m in model.named_modules()}
    attention_class = type(model.blocks[0].attn)
    first = patch(model, backend=BACKEND)
    assert len(first.replaced) == 9 and not first.left
    patched_classes = {name: type(m) for name, m in model.named_modules()}
    assert isinstance(model.blocks[0].attn, attention_class)  # a subclass of its own class
    assert type(model.blocks[0].attn).__name__ == attention_class.__name__
    second = patch(model, backend=BACKEND)
    assert not second.replaced and len(second.unchanged) == 9
    assert {name: type(m) for name, m in model.named_modules()} == patched_classes
    restored = unpatch(model)
    assert restored.action == "restored" and len(restored.replaced) == 9
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not hasattr(model.blocks[0], "backend") and not hasattr(
        model.blocks[0], "_dinov2_fast_added"
    )
    assert not hasattr(model.blocks[0], "sample_drop_ratio")
    assert not unpatch(model).replaced


def test_flags_choose_what_is_patched():
    model = _timm_model("small")
    report = patch(model, attention=False, stochastic_depth=False)
    assert report.counts()["replaced"] == {"layer_norm": 5, "attention": 0, "block": 0}
    report = patch(model, layer_norm=False)
    assert report.counts()["replaced"] == {"layer_norm": 0, "attention": 2, "block": 2}
    assert "patched 0 layer_norm, 2 attention, 2 block" in str(report)


def test_report_says_what_was_left_and_why():
    qk_norm = _timm_model("small", qk_norm=True)
    report = patch(qk_norm)
    assert [e.kind for e in report.left] == ["attention", "attention"]
    assert "qk_norm" in report.left[0].reason and report.left[0].name == "blocks.0.attn"
    assert report.counts()["replaced"]["block"] == 2  # the blocks still get our residual logic
    assert "qk_norm" in str(report)

    odd_head = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=14, embed_dim=96, depth=1, num_heads=2, num_classes=0
    )
    report = patch(odd_head)
    assert "head dim 48" in report.left[0].reason

    post_norm = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=2, num_classes=0,
        block_fn=timm.models.vision_transformer.ResPostBlock,
    )  # fmt: skip
    report = patch(post_norm)
    assert [e.kind for e in report.left] == ["block"]
    assert "ResPostBlock" in report.left[0].reason

    channels_first = nn.Sequential(timm.layers.LayerNorm2d(8), nn.LayerNorm(8))
    report = patch(channels_first)
    assert [e.name for e in report.left] == ["0"] and [e.name for e in report.replaced] == ["1"]


def test_a_wrapper_class_made_after_patching_keeps_unpatch_from_breaking_it():
    model = _timm_model("small", depth=1)
    patch(model)
    block = model.blocks[0]
    block.__class__ = type("Wrapped" + type(block).__name__, (type(block),), {})
    report = unpatch(model)
    assert [e.name for e in report.left] == ["blocks.0"]
    assert "unpatch before wrapping" in report.left[0].reason
    assert type(model.blocks[0]).__name__ == "WrappedBlock"


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch("vit")
    with pytest.raises(TypeError, match="attention must be a bool"):
        patch(nn.Linear(2, 2), attention=1)
    with pytest.raises(ValueError, match="backend"):
        patch(nn.Linear(2, 2), backend="fast")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unpatch(None)
    assert isinstance(patch(nn.Linear(2, 2)), PatchReport)


def test_already_dinov2_fast_modules_are_unchanged():
    from dinov2_fast import nn as fast_nn

    block = fast_nn.Block(64, 2, qkv_bias=True, init_values=1.0)
    report = patch(block)
    assert not report.replaced and {e.kind for e in report.unchanged} == {
        "layer_norm",
        "attention",
        "block",
    }


@pytest.mark.slow
def test_torch_compile_traces_a_patched_model_without_graph_breaks():
    torch._dynamo.reset()
    model = _timm_model("reg4").eval()
    patch(model, backend=BACKEND)
    images = torch.randn(2, 3, IMG, IMG, device=DEVICE)
    explanation = torch._dynamo.explain(model)(images)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images))
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(images).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


# --- a model of DINOv2's layout (DINOv2's own classes, re-implemented in tests/dinov2_reference.py) ---


class NestedTensorBlock(RefNestedBlock):
    """The block under DINOv2's class name, as DINOv2's builders make it."""


def _dinov2_model(drop_path_rate=0.0, **kwargs):
    model = RefDinoVisionTransformer(
        img_size=IMG,
        patch_size=14,
        embed_dim=128,
        depth=4,
        num_heads=2,
        init_values=1.0,
        block_chunks=2,  # keys blocks.{chunk}.{i}, as in DINOv2's training checkpoints
        drop_path_rate=drop_path_rate,
        drop_path_uniform=True,
        block_fn=NestedTensorBlock,
        **kwargs,
    )
    return randomize_weights(model).to(DEVICE)


def _features(model, inputs):
    out = model.forward_features(inputs[0])
    return torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].flatten(1)], dim=1)


def _features_list(model, inputs):
    """Global and local crops through the packed path (DINOv2's student forward)."""
    outs = model.forward_features_list(inputs, [None] * len(inputs))
    return torch.cat([o["x_norm_patchtokens"].flatten() for o in outs])


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("train, drop_path_rate", [(False, 0.0), (True, 0.0), (True, 0.4)])
def test_dinov2_layout_matches_unpatched(registers, train, drop_path_rate):
    report = _compare(
        lambda: _dinov2_model(drop_path_rate, num_register_tokens=registers),
        train=train,
        seed=11,
        apply=_features,
    )
    assert report.counts()["replaced"] == {"layer_norm": 9, "attention": 4, "block": 4}


@pytest.mark.parametrize("train, drop_path_rate", [(False, 0.0), (True, 0.05), (True, 0.4)])
def test_dinov2_layout_packed_crops_match_unpatched(train, drop_path_rate):
    """forward_features_list: without xFormers DINOv2's list path cannot run; patched, it runs
    packed with our kernels and equals the reference's (the same subset draws per group)."""
    crops = [torch.randn(3, 3, IMG, IMG, device=DEVICE), torch.randn(5, 3, 28, 28, device=DEVICE)]
    _compare(
        lambda: _dinov2_model(drop_path_rate),
        train=train,
        seed=5,
        apply=_features_list,
        inputs=crops,
    )


def test_vit_blocks_finds_ours_dinov2s_and_timms_blocks():
    from dinov2_fast.patch import is_vit_block, vit_blocks

    timm_model = _timm_model("small", depth=3)
    assert [name for name, _ in vit_blocks(timm_model)] == ["blocks.0", "blocks.1", "blocks.2"]
    patch(timm_model)
    assert len(vit_blocks(timm_model)) == 3  # patched blocks too
    dinov2 = _dinov2_model()  # chunked: blocks.{chunk}.{i}
    names = [name for name, _ in vit_blocks(dinov2)]
    assert names == ["blocks.0.0", "blocks.0.1", "blocks.1.2", "blocks.1.3"]
    ours = models.DinoVisionTransformer(28, 14, embed_dim=64, depth=2, num_heads=2, block_chunks=0)
    assert [name for name, _ in vit_blocks(ours)] == ["blocks.0", "blocks.1"]
    post_norm = timm.models.vision_transformer.ResPostBlock(64, 2)
    assert not is_vit_block(post_norm) and not is_vit_block(nn.Linear(2, 2))


def test_dinov2_layout_state_dict_round_trips():
    model = _dinov2_model()
    keys = list(model.state_dict())
    assert "blocks.1.3.attn.qkv.weight" in keys  # chunk 1 holds blocks 2 and 3 after Identity pads
    patch(model)
    assert list(model.state_dict()) == keys
    unpatch(model)
    fresh = _dinov2_model()
    patch(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
