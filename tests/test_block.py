"""nn.Block against DINOv2's block (tests/dinov2_reference.py, float64): eval, the subset stochastic
depth of the tensor path, the mask drop path, the packed list path; gradients included. Also the
small modules (LayerScale, DropPath, Mlp, SwiGLUFFNFused) and the DINOv2-named helpers."""

from __future__ import annotations

import functools

import pytest
import torch
from dinov2_reference import RefBlock, RefMlp, RefSwiGLUFFNFused
from dinov2_reference import drop_add_residual_stochastic_depth as ref_drop_add
from dinov2_reference import drop_add_residual_stochastic_depth_list as ref_drop_add_list
from reference import assert_close_to_reference, randomize_weights

from dinov2_fast import _backend, nn
from dinov2_fast.nn import block as block_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM, HEADS = 64, 2  # head dim 32: a kernel head dim


def _backends():
    backends = ["torch"]
    if not _backend.unavailable_reason("triton", torch.device(DEVICE)):
        backends.append("triton")
    return backends


def _blocks(drop_path, backend, ffn="mlp", init_values=1.0):
    """Our block (fp32, random weights of unit scale) and DINOv2's with the same weights (fp64)."""
    ours = nn.Block(
        DIM,
        HEADS,
        qkv_bias=True,
        init_values=init_values,
        drop_path=drop_path,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6, backend=backend),
        attn_class=functools.partial(nn.MemEffAttention, backend=backend),
        ffn_layer=nn.Mlp if ffn == "mlp" else nn.SwiGLUFFNFused,
        backend=backend,
    )
    randomize_weights(ours)
    ref_ffn = RefMlp if ffn == "mlp" else RefSwiGLUFFNFused
    ref = RefBlock(
        DIM,
        HEADS,
        qkv_bias=True,
        init_values=init_values,
        drop_path=drop_path,
        ffn_layer=ref_ffn,
        eps=1e-6,
    ).double()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours.to(DEVICE), ref.to(DEVICE)


def _run(block, inputs, seed, grad_outputs):
    """Forward under ``seed`` (the same random draws for both blocks), then backward."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    torch.manual_seed(seed)
    out = block(leaves if len(leaves) > 1 else leaves[0])
    outs = out if isinstance(out, list) else [out]
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grad_outputs)])
    params = {name: p.grad for name, p in block.named_parameters()}
    return [o.detach() for o in outs], [x.grad for x in leaves], params


def _check_pair(ours, ref, shapes, seed=0, condition=8.0):
    inputs = [torch.randn(shape, device=DEVICE) for shape in shapes]
    grads = [torch.randn(shape, device=DEVICE, dtype=torch.float64) for shape in shapes]
    outs, dxs, dparams = _run(ours, inputs, seed, grads)
    ref_outs, ref_dxs, ref_dparams = _run(ref, [x.double() for x in inputs], seed, grads)
    for i, (out, ref_out) in enumerate(zip(outs, ref_outs)):
        assert_close_to_reference(out, ref_out, f"out[{i}]", condition)
    for i, (dx, ref_dx) in enumerate(zip(dxs, ref_dxs)):
        assert_close_to_reference(dx, ref_dx, f"dx[{i}]", condition)
    for name, grad in dparams.items():
        ref_grad = ref_dparams[name]
        assert (grad is None) == (ref_grad is None), name
        if grad is not None:
            assert_close_to_reference(grad, ref_grad, f"d{name}", condition * 16)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_eval_equals_dinov2_block(backend, ffn, batch):
    ours, ref = _blocks(0.3, backend, ffn)
    ours.eval(), ref.eval()
    _check_pair(ours, ref, [(batch, 9, DIM)])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("drop_path", [0.0, 0.05, 0.3, 0.4])
@pytest.mark.parametrize("batch", [1, 5, 7])
def test_training_tensor_path_equals_dinov2(backend, drop_path, batch):
    """p > 0.1: the same randperm subsets as DINOv2's drop_add_residual_stochastic_depth;
    0 < p <= 0.1: the same Bernoulli masks; p = 0: the plain residual."""
    ours, ref = _blocks(drop_path, backend)
    ours.train(), ref.train()
    _check_pair(ours, ref, [(batch, 11, DIM)], seed=batch)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("drop_path", [0.0, 0.05, 0.3, 0.4])
@pytest.mark.parametrize("init_values", [1.0, None])
def test_training_list_path_equals_dinov2(backend, drop_path, init_values):
    """Packed multi-crop: a subset per group for any p > 0, LayerScale folded into the update."""
    ours, ref = _blocks(drop_path, backend, init_values=init_values)
    ours.train(), ref.train()
    _check_pair(ours, ref, [(5, 9, DIM), (7, 4, DIM), (1, 3, DIM)], seed=3)


@pytest.mark.parametrize("drop_path", [0.3, 0.05])
def test_training_with_torch_layer_norm(drop_path):
    """A norm that is not ours: the kept samples are gathered, then the module runs on them."""
    ours, ref = _blocks(drop_path, "torch")
    for name in ("norm1", "norm2"):
        torch_norm = torch.nn.LayerNorm(DIM, eps=1e-6).to(DEVICE)
        torch_norm.load_state_dict(getattr(ours, name).state_dict())
        setattr(ours, name, torch_norm)
    ours.train(), ref.train()
    _check_pair(ours, ref, [(6, 5, DIM)], seed=7)
    _check_pair(ours, ref, [(6, 5, DIM), (3, 2, DIM)], seed=8)


@pytest.mark.parametrize("backend", _backends())
def test_eval_list_path_equals_each_group_alone(backend):
    ours, _ = _blocks(0.4, backend, ffn="swiglu")
    ours.eval()
    groups = [torch.randn(4, 9, DIM, device=DEVICE), torch.randn(6, 5, DIM, device=DEVICE)]
    packed = ours(groups)
    for i, (group, out) in enumerate(zip(groups, packed)):
        assert_close_to_reference(out, ours(group).double(), f"group {i}", 8.0)


@pytest.mark.parametrize("backend", _backends())
def test_training_list_path_equals_each_group_with_its_subset(backend):
    """With p > 0 each group keeps its own samples: run group by group with the same subsets."""
    ours, _ = _blocks(0.4, backend)
    ours.train()
    groups = [torch.randn(5, 9, DIM, device=DEVICE), torch.randn(8, 4, DIM, device=DEVICE)]
    torch.manual_seed(11)
    packed = ours(groups)
    # The packed path draws attn subsets for group 0 then 1, then the ffn subsets likewise.
    torch.manual_seed(11)
    draws = [torch.randperm(g.shape[0], device=DEVICE) for g in groups * 2]
    for i, group in enumerate(groups):
        outs = []
        x = group
        for branch, ls, perm in (
            (ours._attn_branch, ours.ls1, draws[i]),
            (ours._ffn_branch, ours.ls2, draws[2 + i]),
        ):
            kept = max(int(x.shape[0] * 0.6), 1)
            index = perm[:kept]
            residual = branch(x[index]) * ls.gamma
            x = torch.index_add(x, 0, index, residual, alpha=x.shape[0] / kept)
            outs.append(x)
        assert_close_to_reference(packed[i], x.double(), f"group {i}", 8.0)


def _relative_errors(result, expected) -> list[float]:
    """|got - want| / |want| of every output, input gradient and parameter gradient of _run."""
    got = result[0] + result[1] + [result[2][name] for name in expected[2]]
    want = expected[0] + expected[1] + list(expected[2].values())
    return [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]


def test_cuda_backend_block_in_bf16_is_as_close_as_torch(emulated_cuda):
    """Every op of the block on the CUDA kernels (emulated): attention (bf16 only), LayerNorm,
    the stochastic-depth gather and update, on the tensor and the packed path at drop rate 0.4.
    In bf16, against float64: within twice the error of the same block on backend="torch"."""
    ours, ref = _blocks(0.4, "cuda")
    plain, _ = _blocks(0.4, "torch")
    plain.load_state_dict(ours.state_dict())
    ours, plain = ours.bfloat16().train(), plain.bfloat16().train()
    ref.train()
    for shapes in ([(6, 37, DIM)], [(6, 37, DIM), (9, 5, DIM)]):
        inputs = [torch.randn(s).bfloat16() for s in shapes]
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        expected = _run(ref, [x.double() for x in inputs], 4, grads)
        cuda = _relative_errors(_run(ours, inputs, 4, grads), expected)
        baseline = _relative_errors(_run(plain, inputs, 4, grads), expected)
        for i, (error, torch_error) in enumerate(zip(cuda, baseline)):
            assert error <= 2 * torch_error + 1e-3, f"tensor {i}: {error:.3g} vs {torch_error:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("drop_path", [0.0, 0.05, 0.4])
def test_gpu_block_matches_dinov2(drop_path):
    """fp32 on the GPU: the kernels (Triton attention, LayerNorm, stochastic depth) and SDPA."""
    for backend in _backends():
        for training in (False, True):
            ours, ref = _blocks(drop_path, backend)
            ours.train(training), ref.train(training)
            _check_pair(ours, ref, [(7, 257, DIM)], seed=1)
            _check_pair(ours, ref, [(5, 257, DIM), (9, 50, DIM)], seed=2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_gpu_vit_large_block_under_autocast(backend):
    """A ViT-L block in bf16 autocast against the float64 reference: relative error of the
    outputs and gradients at bf16 level, on the tensor and the packed path at drop rate 0.4."""
    torch.manual_seed(0)
    ours = nn.Block(
        1024,
        16,
        qkv_bias=True,
        init_values=1.0,
        drop_path=0.4,
        norm_layer=functools.partial(nn.LayerNorm, backend=backend),
        attn_class=functools.partial(nn.MemEffAttention, backend=backend),
        backend=backend,
    )
    ours = ours.cuda().train()
    ref = RefBlock(1024, 16, qkv_bias=True, init_values=1.0, drop_path=0.4, eps=1e-5)
    ref = ref.double().cuda().train()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    for shapes in ([(16, 257, 1024)], [(16, 257, 1024), (64, 50, 1024)]):
        inputs = [torch.randn(s, device="cuda") for s in shapes]
        grads = [torch.randn(s, device="cuda", dtype=torch.float64) for s in shapes]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs, dxs, dparams = _run(ours, inputs, 4, grads)
        ref_outs, ref_dxs, ref_dparams = _run(ref, [x.double() for x in inputs], 4, grads)
        pairs = list(zip(outs + dxs, ref_outs + ref_dxs))
        pairs += [(dparams[name], ref_dparams[name]) for name in ref_dparams]
        for got, expected in pairs:
            error = (got.double() - expected).norm() / expected.norm()
            assert error < 2e-2, f"relative error {error:.3g}"


def test_training_ratio_zero_is_the_plain_residual():
    ours, _ = _blocks(0.0, "torch")
    x = torch.randn(3, 5, DIM, device=DEVICE)
    ours.eval()
    expected = ours(x)
    ours.train()
    torch.testing.assert_close(ours(x), expected)


def test_subset_sizes_follow_dinov2():
    for batch, ratio, kept in [(1, 0.4, 1), (5, 0.4, 3), (7, 0.3, 4), (64, 0.4, 38), (2, 0.9, 1)]:
        index, scale = block_module.get_branges_scales(torch.empty(batch, 1), ratio)
        assert len(index) == kept and scale == batch / kept
        assert len(set(index.tolist())) == kept and max(index.tolist()) < batch


def test_drop_add_residual_stochastic_depth_matches_dinov2():
    x = torch.randn(6, 4, 8)
    gamma = torch.rand(8) + 0.5
    torch.manual_seed(5)
    ours = block_module.drop_add_residual_stochastic_depth(x, torch.tanh, 0.35, gamma)
    torch.manual_seed(5)
    expected = ref_drop_add(x.double(), lambda t: torch.tanh(t) * gamma.double(), 0.35)
    assert_close_to_reference(ours, expected, "out")


def test_drop_add_residual_stochastic_depth_list_matches_dinov2():
    groups = [torch.randn(6, 4, 8), torch.randn(3, 2, 8)]
    gamma = torch.rand(8) + 0.5
    weight = torch.randn(8, 8)

    def residual(x, attn_bias=None):
        return torch.tanh(x @ weight)  # mixes channels, not tokens: the mask is not needed

    torch.manual_seed(6)
    ours = block_module.drop_add_residual_stochastic_depth_list(groups, residual, 0.4, gamma)
    torch.manual_seed(6)
    expected = ref_drop_add_list(
        [g.double() for g in groups],
        lambda x, attn_bias=None: torch.tanh(x @ weight.double()),
        0.4,
        gamma.double(),
    )
    for i, (out, ref) in enumerate(zip(ours, expected)):
        assert_close_to_reference(out, ref, f"group {i}", 4.0)


def test_state_dict_keys_match_dinov2():
    for ffn in ("mlp", "swiglu"):
        for init_values in (1e-5, None):
            ours, ref = _blocks(0.1, "torch", ffn, init_values)
            assert list(ours.state_dict()) == list(ref.state_dict())
            for key, value in ref.state_dict().items():
                assert ours.state_dict()[key].shape == value.shape, key
    assert nn.NestedTensorBlock is nn.Block


def test_children_and_attributes():
    block = nn.Block(DIM, HEADS, init_values=1e-5, drop_path=0.2)
    names = [name for name, _ in block.named_children()]
    assert names == ["norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"]
    assert block.sample_drop_ratio == 0.2
    assert isinstance(block.drop_path1, nn.DropPath) and block.drop_path1.drop_prob == 0.2
    assert torch.equal(block.ls1.gamma, torch.full((DIM,), 1e-5))
    plain = nn.Block(DIM, HEADS)
    assert isinstance(plain.ls1, torch.nn.Identity) and isinstance(
        plain.drop_path2, torch.nn.Identity
    )


def test_bad_inputs_raise_clear_errors():
    block = nn.Block(DIM, HEADS)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        block(torch.randn(4, DIM))
    with pytest.raises(ValueError, match=r"x\[1\] must have x\[0\]'s channels"):
        block([torch.randn(2, 3, DIM), torch.randn(2, 3, DIM // 2)])
    with pytest.raises(ValueError, match="at least one"):
        block([])
    with pytest.raises(TypeError, match="tensor or a list"):
        block("x")
    with pytest.raises(ValueError, match="backend"):
        nn.Block(DIM, HEADS, backend="fast")


def test_layer_scale_and_drop_path():
    ls = nn.LayerScale(5, init_values=0.25)
    x = torch.randn(3, 5)
    torch.testing.assert_close(ls(x), x * 0.25)
    ls_inplace = nn.LayerScale(5, init_values=torch.arange(5.0), inplace=True)
    y = x.clone()
    assert ls_inplace(y) is y
    torch.testing.assert_close(y, x * torch.arange(5.0))
    drop = nn.DropPath(0.5)
    drop.eval()
    assert drop(x) is x
    drop.train()
    torch.manual_seed(0)
    out = drop(torch.ones(4000, 2))
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    assert abs(out.mean().item() - 1.0) < 0.1  # unbiased: kept samples scaled by 1 / keep


def test_ffn_modules_shapes_and_math():
    fused = nn.SwiGLUFFNFused(1536, 6144)  # ViT-g: hidden 4096
    assert fused.w12.weight.shape == (8192, 1536) and fused.w3.weight.shape == (1536, 4096)
    x = torch.randn(2, 3, 1536)
    gate, value = fused.w12(x).chunk(2, -1)
    torch.testing.assert_close(fused(x), fused.w3(torch.nn.functional.silu(gate) * value))
    mlp = nn.Mlp(8, 32)
    assert mlp.fc1.weight.shape == (32, 8) and mlp.fc2.weight.shape == (8, 32)
    assert list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
