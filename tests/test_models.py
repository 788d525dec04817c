"""dinov2_fast.models against DINOv2's classes (tests/dinov2_reference.py, float64) and timm.

DinoVisionTransformer: keys, shapes and initial weights of DINOv2's layouts (flat, registers,
SwiGLU, chunked), the hub configurations' key and parameter counts (built on the meta device),
every forward (features, masks, registers, intermediate layers, interpolated positions, the
packed list path) in eval and in training with drop path under the same random draws, gradients.
DINOHead against DINOv2's weight_norm head. timm's DINOv2 ViTs converted by from_timm. Bad input.
"""

from __future__ import annotations

import functools

import pytest
import torch
from dinov2_reference import RefDINOHead, RefDinoVisionTransformer, RefNestedBlock
from reference import assert_close_to_reference, randomize_weights

from dinov2_fast import _backend, models, nn

try:
    import timm
except ImportError:  # timm is a test extra
    timm = None

needs_timm = pytest.mark.skipif(timm is None, reason="needs timm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM, HEADS, DEPTH, PATCH = 64, 2, 4, 7  # head dim 32; 28 px -> a 4 x 4 grid

# Small DINOv2 layouts: the hub's (flat blocks, LayerScale), with registers, with SwiGLU, chunked.
CONFIGS = {
    "flat": dict(block_chunks=0, init_values=1.0),
    "reg4": dict(
        block_chunks=0,
        init_values=1.0,
        num_register_tokens=4,
        interpolate_antialias=True,
        interpolate_offset=0.0,
    ),
    "swiglu": dict(block_chunks=0, init_values=1.0, ffn_layer="swiglufused"),
    "chunked": dict(block_chunks=4, num_register_tokens=2),
    "default": dict(),  # block_chunks=1, no LayerScale
}


def _config(name, **overrides):
    config = dict(
        img_size=28, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0
    )
    config.update(CONFIGS[name])
    config.update(overrides)
    return config


def _randomize(module: torch.nn.Module) -> None:
    randomize_weights(module, spread=0.5)


def _pair(name, backend="torch", **overrides):
    """Our model (fp32, random weights) and DINOv2's with the same weights (fp64)."""
    config = _config(name, **overrides)
    ours = models.DinoVisionTransformer(**config, backend=backend)
    _randomize(ours)
    ref = RefDinoVisionTransformer(**config).double()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()}, strict=True)
    return ours.to(DEVICE), ref.to(DEVICE)


def _images(batch, size=28):
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, height, width, device=DEVICE)


def _check(actual, expected, name, condition=16.0):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), name
        for key in expected:
            _check(actual[key], expected[key], f"{name}[{key}]", condition)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), name
        for i, (a, e) in enumerate(zip(actual, expected)):
            _check(a, e, f"{name}[{i}]", condition)
    elif expected is None or expected.dtype == torch.bool:
        assert actual is expected or torch.equal(actual, expected), name
    else:
        assert_close_to_reference(actual, expected, name, condition)


def _run(model, fn, inputs, seed):
    """``fn(model, inputs)`` under ``seed`` (the same random draws for both models)."""
    torch.manual_seed(seed)
    return fn(model, inputs)


# --- layout and initialisation --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_keys_shapes_and_init_equal_dinov2(name):
    torch.manual_seed(1)
    ours = models.DinoVisionTransformer(**_config(name))
    torch.manual_seed(1)
    ref = RefDinoVisionTransformer(**_config(name))
    # Same keys in the same order, and with one seed the same initial weights: DINOv2's init
    # scheme and order of random draws.
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert (ours.register_tokens is None) == (ref.register_tokens is None)
    assert ours.mask_token.abs().sum() == 0
    for attr in ("num_features", "embed_dim", "num_tokens", "n_blocks", "num_heads", "patch_size",
                 "num_register_tokens", "interpolate_antialias", "interpolate_offset",
                 "chunked_blocks"):  # fmt: skip
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert isinstance(ours.head, torch.nn.Identity)


def test_block_chunk_keys():
    keys = lambda model: sorted(
        k.split(".norm1.")[0] for k in model.state_dict() if ".norm1.w" in k
    )
    chunked = models.DinoVisionTransformer(**_config("chunked", depth=8))
    assert keys(chunked) == [f"blocks.{i // 2}.{i}" for i in range(8)]
    assert all(isinstance(c, models.BlockChunk) for c in chunked.blocks)
    assert isinstance(chunked.blocks[1][0], torch.nn.Identity)
    assert keys(models.DinoVisionTransformer(**_config("default"))) == [
        f"blocks.0.{i}" for i in range(DEPTH)
    ]
    assert keys(models.DinoVisionTransformer(**_config("flat"))) == [
        f"blocks.{i}" for i in range(DEPTH)
    ]


def test_hub_configs_on_meta():
    """The hub models' key counts, shapes and parameter counts, and DINOv2's identical keys."""
    counts = {}
    with torch.device("meta"):
        for arch in ("s", "b", "l", "g"):
            model = getattr(models, f"dinov2_vit{arch}14")()
            counts[arch] = sum(p.numel() for p in model.parameters())
        vits = models.dinov2_vits14()
        ref_vits = RefDinoVisionTransformer(**models.hub_config("dinov2_vits14"))
        vitg_reg = models.dinov2_vitg14_reg()
        ref_vitg_reg = RefDinoVisionTransformer(**models.hub_config("dinov2_vitg14_reg"))
    expected = {"s": 22.06e6, "b": 86.58e6, "l": 304.37e6, "g": 1136.48e6}
    for arch, count in counts.items():
        assert round(count / 1e4) == round(expected[arch] / 1e4), (arch, count)
    assert len(vits.state_dict()) == 175 and len(vitg_reg.state_dict()) == 568
    for ours, ref in ((vits, ref_vits), (vitg_reg, ref_vitg_reg)):
        assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
            (k, v.shape) for k, v in ref.state_dict().items()
        ]
    shapes = {k: tuple(v.shape) for k, v in vitg_reg.state_dict().items()}
    assert shapes["pos_embed"] == (1, 1370, 1536) and shapes["register_tokens"] == (1, 4, 1536)
    assert shapes["blocks.39.mlp.w12.weight"] == (8192, 1536)
    assert shapes["blocks.39.mlp.w3.weight"] == (1536, 4096)
    assert vitg_reg.interpolate_antialias and vitg_reg.interpolate_offset == 0.0
    assert vits.patch_embed.num_patches == 37 * 37 and not vits.chunked_blocks


def test_builders():
    with torch.device("meta"):
        for builder, (dim, depth, heads) in (
            (models.vit_small, (384, 12, 6)),
            (models.vit_base, (768, 12, 12)),
            (models.vit_large, (1024, 24, 16)),
            (models.vit_giant2, (1536, 40, 24)),
        ):
            model = builder(patch_size=14, num_register_tokens=4)
            assert (model.embed_dim, model.n_blocks, model.num_heads) == (dim, depth, heads)
            assert model.patch_size == 14 and model.register_tokens.shape == (1, 4, dim)
            assert model.blocks[0][0].mlp.fc1.out_features == 4 * dim
            assert isinstance(model.blocks[0][0].attn, nn.MemEffAttention)
            assert isinstance(model.norm, nn.LayerNorm) and model.norm.eps == 1e-6


def test_stock_block_fn_and_norm_layer():
    """A plain-PyTorch model of the same layout: block_fn and norm_layer called as DINOv2 does."""
    calls = []

    def block_fn(**kwargs):
        calls.append(kwargs)
        return RefNestedBlock(**kwargs)

    config = _config("flat")
    torch.manual_seed(2)
    plain = models.DinoVisionTransformer(
        **config, block_fn=block_fn, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)
    )
    assert len(calls) == DEPTH and set(calls[0]) == {
        "dim", "num_heads", "mlp_ratio", "qkv_bias", "proj_bias", "ffn_bias", "drop_path",
        "norm_layer", "act_layer", "ffn_layer", "init_values",
    }  # fmt: skip
    assert calls[0]["ffn_layer"] is nn.Mlp and type(plain.norm) is torch.nn.LayerNorm
    torch.manual_seed(2)
    ref = RefDinoVisionTransformer(**config)
    for key, value in ref.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    x = _images(2)
    torch.testing.assert_close(plain.to(DEVICE)(x), ref.to(DEVICE)(x))


# --- forwards against DINOv2 ---------------------------------------------------------------------


def _features_with_grads(model, inputs):
    images, masks = inputs
    leaf = images.detach().clone().requires_grad_()
    out = model.forward_features(leaf, masks=masks)
    loss = (out["x_prenorm"] * out["x_prenorm"].detach().sin()).sum()
    loss = loss + out["x_norm_patchtokens"].square().sum() + out["x_norm_clstoken"].sum()
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return out, leaf.grad, grads


@pytest.mark.parametrize("name", ["flat", "reg4", "swiglu", "chunked"])
def test_forward_features_equal_dinov2(name):
    """Eval: the dict (CLS, registers, patches, prenorm, masks), with masked patches; gradients."""
    ours, ref = _pair(name)
    ours.eval(), ref.eval()
    images = _images(3)
    masks = torch.rand(3, 16, device=DEVICE) < 0.4
    out, dx, grads = _features_with_grads(ours, (images, masks))
    ref_out, ref_dx, ref_grads = _features_with_grads(ref, (images.double(), masks))
    _check(out, ref_out, "out")
    assert out["x_norm_regtokens"].shape == (3, ours.num_register_tokens, DIM)
    assert out["masks"] is masks
    _check(dx, ref_dx, "dx", 64.0)
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        _check(grad, ref_grads[key], f"d{key}", 256.0)
    # forward() is the head (Identity) of the normed CLS token; is_training gives the dict.
    with torch.no_grad():
        _check(ours(images), ref(images.double()), "forward")
        assert ours(images, is_training=True).keys() == out.keys()


@pytest.mark.parametrize("drop_path", [0.0, 0.2, 0.4])
@pytest.mark.parametrize("uniform", [False, True])
def test_training_tensor_path_equals_dinov2(drop_path, uniform):
    """Training: DINOv2's drop path schedule and draws (subsets above 0.1, masks below)."""
    ours, ref = _pair("reg4", drop_path_rate=drop_path, drop_path_uniform=uniform)
    ours.train(), ref.train()
    images = _images(5)
    masks = torch.rand(5, 16, device=DEVICE) < 0.3
    out, dx, grads = _run(ours, _features_with_grads, (images, masks), 7)
    ref_out, ref_dx, ref_grads = _run(ref, _features_with_grads, (images.double(), masks), 7)
    _check(out, ref_out, "out")
    _check(dx, ref_dx, "dx", 64.0)
    for key, grad in grads.items():
        _check(grad, ref_grads[key], f"d{key}", 256.0)
    rates = [b.sample_drop_ratio for b in ours._block_list()]
    assert rates == [b.sample_drop_ratio for b in ref.blocks]


def _list_features(model, inputs):
    groups, masks = inputs
    leaves = [g.detach().clone().requires_grad_() for g in groups]
    outs = model.forward_features(leaves, masks)
    loss = sum((o["x_prenorm"] * o["x_prenorm"].detach().cos()).sum() for o in outs)
    loss = loss + sum(o["x_norm_clstoken"].square().sum() for o in outs)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return outs, [leaf.grad for leaf in leaves], grads


@pytest.mark.parametrize("training,drop_path", [(False, 0.3), (True, 0.0), (True, 0.3)])
@pytest.mark.parametrize("name", ["reg4", "chunked"])
def test_forward_features_list_equals_dinov2(name, training, drop_path):
    """The packed multi-crop path: two crop sizes (each its own positional embedding), masks on
    the global crops only; in training each group keeps its own random subset."""
    ours, ref = _pair(name, drop_path_rate=drop_path)
    ours.train(training), ref.train(training)
    groups = [_images(4, 28), _images(6, 14)]
    masks = [torch.rand(4, 16, device=DEVICE) < 0.4, None]
    outs, dxs, grads = _run(ours, _list_features, (groups, masks), 3)
    ref_outs, ref_dxs, ref_grads = _run(
        ref, _list_features, ([g.double() for g in groups], masks), 3
    )
    _check(outs, ref_outs, "outs")
    _check(dxs, ref_dxs, "dx", 64.0)
    for key, grad in grads.items():
        _check(grad, ref_grads[key], f"d{key}", 256.0)
    if not training:  # each group alone through the tensor path gives the same
        with torch.no_grad():
            for i, group in enumerate(groups):
                _check(ours.forward_features(group, masks[i]), ref_outs[i], f"alone[{i}]")
            heads = ours(groups, masks)
        _check(heads, [o["x_norm_clstoken"] for o in ref_outs], "forward(list)")


@pytest.mark.parametrize("name", ["flat", "reg4"])
@pytest.mark.parametrize("size", [42, (28, 42), 14])
def test_interpolated_positions_equal_dinov2(name, size):
    """Another input size: bicubic in fp32 with DINOv2's offset 0.1 (flat) or antialias and
    offset 0 (reg4); non-square inputs too."""
    ours, ref = _pair(name)
    ours.eval(), ref.eval()
    images = _images(2, size)
    tokens = ours.patch_embed(images)
    tokens = torch.cat((ours.cls_token.expand(2, -1, -1), tokens), dim=1)
    pos = ours.interpolate_pos_encoding(tokens, *images.shape[-2:])
    ref_pos = ref.interpolate_pos_encoding(tokens.double(), *images.shape[-2:])
    grid = (images.shape[2] // PATCH) * (images.shape[3] // PATCH)
    assert pos.shape == (1, 1 + grid, DIM)
    _check(pos, ref_pos, "pos")
    with torch.no_grad():
        _check(ours.forward_features(images), ref.forward_features(images.double()), "features")
    # The trained size returns pos_embed itself.
    same = torch.zeros(1, 17, DIM, device=DEVICE)
    assert ours.interpolate_pos_encoding(same, 28, 28) is ours.pos_embed


@pytest.mark.parametrize("name", ["flat", "chunked", "default"])
def test_get_intermediate_layers_equal_dinov2(name):
    ours, ref = _pair(name)
    ours.eval(), ref.eval()
    images = _images(2, (28, 35))
    with torch.no_grad():
        for kwargs in (
            dict(n=1),
            dict(n=3, return_class_token=True),
            dict(n=[0, 2], reshape=True),
            dict(n=[3, 1], norm=False, reshape=True, return_class_token=True),
        ):
            out = ours.get_intermediate_layers(images, **kwargs)
            expected = ref.get_intermediate_layers(images.double(), **kwargs)
            _check(out, expected, str(kwargs))
    assert out[0][0].shape == (2, DIM, 4, 5) and out[0][1].shape == (2, DIM)


@pytest.mark.skipif(
    bool(_backend.unavailable_reason("triton", torch.device(DEVICE))), reason="needs Triton"
)
def test_triton_backend_matches_dinov2():
    """Our kernels (the interpreter on CPU) in the packed path, training with drop path."""
    ours, ref = _pair("reg4", backend="triton", drop_path_rate=0.4, depth=2)
    ours.train(), ref.train()
    groups = [_images(2, 14), _images(3, 7)]
    outs, dxs, grads = _run(ours, _list_features, (groups, [None, None]), 5)
    ref_outs, ref_dxs, ref_grads = _run(
        ref, _list_features, ([g.double() for g in groups], [None, None]), 5
    )
    _check(outs, ref_outs, "outs")
    _check(dxs, ref_dxs, "dx", 64.0)
    for key, grad in grads.items():
        _check(grad, ref_grads[key], f"d{key}", 256.0)


def test_weights_load_across_block_layouts(tmp_path):
    """A flat (hub) checkpoint loads into a chunked model and back, from a dict or a file."""
    small = dict(img_size=28, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    flat = models.dinov2_vits14_reg(**small)
    _randomize(flat)
    path = tmp_path / "weights.pth"
    torch.save(flat.state_dict(), path)
    chunked = models.dinov2_vits14_reg(weights=path, block_chunks=2, **small)
    assert "blocks.1.3.norm1.weight" in chunked.state_dict()
    again = models.load_weights(models.dinov2_vits14_reg(**small), chunked.state_dict())
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(chunked(images), flat(images))
        torch.testing.assert_close(again(images), flat(images))


# --- PatchEmbed and DINOHead ---------------------------------------------------------------------


def test_patch_embed():
    embed = nn.PatchEmbed(img_size=(28, 42), patch_size=7, in_chans=3, embed_dim=16)
    assert embed.img_size == (28, 42) and embed.patch_size == (7, 7)
    assert embed.patches_resolution == (4, 6) and embed.num_patches == 24
    assert (embed.in_chans, embed.embed_dim, embed.flatten_embedding) == (3, 16, True)
    assert list(embed.state_dict()) == ["proj.weight", "proj.bias"]
    x = torch.randn(2, 3, 14, 21)
    out = embed(x)
    expected = torch.nn.functional.conv2d(x, embed.proj.weight, embed.proj.bias, stride=7)
    torch.testing.assert_close(out, expected.flatten(2).transpose(1, 2))
    unflat = nn.PatchEmbed(patch_size=7, embed_dim=16, flatten_embedding=False)
    unflat.load_state_dict(embed.state_dict())
    grid = unflat(x)
    torch.testing.assert_close(grid, out.reshape(2, 2, 3, 16))
    with pytest.raises(ValueError, match="x's height and width must be multiples"):
        embed(torch.randn(1, 3, 28, 30))
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\]"):
        embed(torch.randn(1, 4, 28, 28))
    with pytest.raises(ValueError, match="patch_size"):
        nn.PatchEmbed(patch_size=0)


@pytest.mark.parametrize("nlayers,use_bn", [(3, False), (3, True), (1, False), (2, False)])
def test_dino_head_equals_dinov2(nlayers, use_bn):
    kwargs = dict(nlayers=nlayers, use_bn=use_bn, hidden_dim=48, bottleneck_dim=24)
    torch.manual_seed(4)
    ours = models.DINOHead(32, 100, **kwargs)
    torch.manual_seed(4)
    ref = RefDINOHead(32, 100, **kwargs)
    # Same keys, and one seed gives DINOv2's initial weights.
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():
        ours.last_layer.weight_g.uniform_(0.5, 2.0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours, ref = ours.double().train(), ref.double().train()
    x = torch.randn(8, 32, dtype=torch.float64)
    outs = []
    for head in (ours, ref):
        leaf = x.clone().requires_grad_()
        out = head(leaf)
        (out * out.detach().sin()).sum().backward()
        grads = {k: p.grad.clone() for k, p in head.named_parameters()}
        outs.append((out.detach(), leaf.grad, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for key in outs[1][2]:
        torch.testing.assert_close(outs[0][2][key], outs[1][2][key], msg=key)


def test_dino_head_keys_and_shapes():
    head = models.DINOHead(384, 65536)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight_g": (65536, 1), "last_layer.weight_v": (65536, 256),
    }  # fmt: skip
    assert torch.all(head.last_layer.weight_g == 1)
    rows = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert list(models.DINOHead(8, 4, nlayers=1, mlp_bias=False).state_dict()) == [
        "mlp.weight", "last_layer.weight_g", "last_layer.weight_v",
    ]  # fmt: skip


# --- timm ----------------------------------------------------------------------------------------

TIMM_VARIANTS = {  # timm architecture and keyword arguments (a function of the timm module)
    "small": ("vit_small_patch14_dinov2", lambda t: {}),
    "reg4": ("vit_small_patch14_reg4_dinov2", lambda t: {}),
    "base": ("vit_base_patch14_dinov2", lambda t: {"depth": 1}),
    # DINOv2's giant MLP in timm (SwiGLUPacked), narrow: 96 wide -> hidden 256, DINOv2's rounding.
    "swiglu": ("vit_giant_patch14_dinov2", lambda t: {"embed_dim": 96, "num_heads": 2}),
    # A packed SwiGLU width that DINOv2's rounding does not give (hidden 96).
    "swiglu_odd": (
        "vit_giant_patch14_dinov2",
        lambda t: {"embed_dim": 64, "num_heads": 2, "mlp_ratio": 3.0},
    ),
    # timm's unpacked SwiGLU (fc1_g, fc1_x, fc2).
    "swiglu_unpacked": (
        "vit_small_patch14_dinov2",
        lambda t: {
            "embed_dim": 64,
            "num_heads": 2,
            "mlp_layer": t.layers.SwiGLU,
            "act_layer": torch.nn.SiLU,
        },
    ),
}


def _timm(variant, **kwargs):
    arch, extra = TIMM_VARIANTS[variant]
    kwargs = {"depth": 2, **extra(timm), **kwargs}
    model = timm.create_model(arch, pretrained=False, img_size=28, **kwargs)
    _randomize(model)
    return model.eval()


@needs_timm
@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
def test_from_timm_equals_timm(variant):
    model = _timm(variant)
    ours = models.from_timm(model).eval()
    assert ours.num_register_tokens == model.num_reg_tokens
    swiglu = variant.startswith("swiglu")
    assert hasattr(ours._block_list()[0].mlp, "w12") == swiglu
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model.forward_features(x).double()
        out = ours.forward_features(x)
        tokens = torch.cat(
            (out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]),
            dim=1,
        )
        _check(tokens, expected, "tokens", 16.0)
        _check(ours(x), model.forward_head(model.forward_features(x)).double(), "head", 16.0)
    converted = models.convert_timm_state_dict(model.state_dict())
    assert models.convert_timm_state_dict(converted).keys() == converted.keys()  # idempotent
    assert set(converted) == set(ours.state_dict())
    if variant == "reg4":  # timm's cls_token holds pos_embed[:, 0]; DINOv2's slot is zero
        assert torch.all(converted["pos_embed"][:, 0] == 0)
        assert converted["pos_embed"].shape[1] == 1 + 4
    assert torch.all(converted["mask_token"] == 0)


@needs_timm
def test_from_timm_options_and_layouts():
    model = _timm("reg4", depth=4, drop_path_rate=0.2)
    ours = models.from_timm(model, block_chunks=2, backend="torch")
    assert ours.chunked_blocks and "blocks.1.3.ls2.gamma" in ours.state_dict()
    rates = [b.sample_drop_ratio for b in ours._block_list()]
    timm_rates = [
        b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in model.blocks
    ]
    torch.testing.assert_close(torch.tensor(rates), torch.tensor(timm_rates))
    assert ours.interpolate_antialias and ours.interpolate_offset == 0.0
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        _check(ours.eval()(x), model.forward_head(model.forward_features(x)).double(), "head")


@needs_timm
def test_timm_conversion_errors():
    classifier = _timm("small", num_classes=10)
    with pytest.raises(ValueError, match=r"drop_head=True.*head\.weight"):
        models.from_timm(classifier)
    ours = models.from_timm(classifier, drop_head=True)
    assert "head.weight" not in ours.state_dict()
    with pytest.raises(ValueError, match="q_norm"):
        models.from_timm(_timm("small", qk_norm=True))
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        models.from_timm(torch.nn.Linear(2, 2))
    state = _timm("small").state_dict()
    with pytest.raises(ValueError, match="no DINOv2 counterpart.*fancy"):
        models.convert_timm_state_dict({**state, "fancy.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="pos_embed must hold M\\*M"):
        models.convert_timm_state_dict({**state, "pos_embed": torch.zeros(1, 7, 384)})
    # timm's registers with positions (no_embed_class=False): DINOv2 has no register positions.
    with pytest.raises(ValueError, match="positions for the 4 register tokens"):
        models.from_timm(_timm("reg4", no_embed_class=False))


# --- bad input -----------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    build = lambda **kw: models.DinoVisionTransformer(**_config("flat", **kw))
    for kwargs, pattern in (
        (dict(num_heads=3), r"embed_dim \(64\) must be divisible by num_heads \(3\)"),
        (dict(block_chunks=3), r"depth \(4\) must be divisible by block_chunks \(3\)"),
        (dict(ffn_layer="gelu"), "ffn_layer must be one of"),
        (dict(backend="fast"), "backend must be one of"),
        (dict(patch_size=(7, 7)), "patch_size must be a positive int"),
        (dict(num_register_tokens=-1), "num_register_tokens"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(interpolate_offset=1.0), "interpolate_offset"),
    ):
        with pytest.raises(ValueError, match=pattern):
            build(**kwargs)
    with pytest.raises(ValueError, match="name must be"):
        models.hub_config("dinov2_vitx14")
    model = build().eval()
    images = _images(2).cpu()
    with pytest.raises(ValueError, match="x's height and width must be multiples"):
        model(torch.randn(2, 3, 28, 30))
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\]"):
        model(torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match=r"masks must be \[B, N\]"):
        model(images, masks=torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must be a bool tensor"):
        model(images, masks=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="masks_list must be a list"):
        model.forward_features([images, images], [None])
    with pytest.raises(ValueError, match="x_list must be a non-empty"):
        model.forward_features_list([], [])
    for n in (0, 5, [4], [1, 1], [-1], []):
        with pytest.raises(ValueError, match="n must be"):
            model.get_intermediate_layers(images, n=n)
    with pytest.raises(TypeError, match="weights must be a state_dict"):
        models.load_weights(model, 3)
