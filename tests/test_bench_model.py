"""`dinov2-fast bench model`: the CLI on the CPU (--quick), the stock block against DINOv2's
(tests/dinov2_reference.py), timm's model, the options and their errors, the headline."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dinov2_reference import RefBlock, RefDinoVisionTransformer, RefMlp
from test_cli import _made_up_gpu_report

from dinov2_fast import benchmark
from dinov2_fast.benchmark import common
from dinov2_fast.benchmark import model as bench
from dinov2_fast.benchmark.timing import Timer
from dinov2_fast.cli import main

HAS_GPU = torch.cuda.is_available()
DIM, HEADS = 64, 2


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One `bench model --quick --device cpu --json PATH` run, shared by the tests below."""
    path = tmp_path_factory.mktemp("bench") / "model.json"
    done = subprocess.run(
        [sys.executable, "-m", "dinov2_fast.cli", "bench", "model", "--quick", "--device", "cpu"]
        + ["--json", str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return done, path


def test_cli_quick_on_cpu_times_both_models_and_both_passes(quick_report, capsys):
    done, path = quick_report
    assert done.returncode == 0, done.stderr
    assert "ViT inference and training step" in done.stdout and "not meaningful" in done.stdout
    report = json.loads(path.read_text())
    assert report["device_type"] == "cpu" and report["benchmarks"] == ["model"]
    results = report["results"]
    config = bench.Options().resolve(quick=True, on_gpu=False)
    assert {r["shape"] for r in results} == {config.name}
    assert [(r["provider"], r["pass"]) for r in results] == [
        (provider.name, pass_) for provider in bench.PROVIDERS for pass_ in bench.PASSES
    ]
    for row in results:
        assert row["benchmark"] == "model" and row["arch"] == config.arch == "vit_small"
        assert (row["batch"], row["img_size"], row["depth"]) == (2, 28, bench.CPU_DEPTH)
        assert row["tokens"] == 1 + 2 * 2 and row["drop_rate"] == 0.4 and row["source"] == "dinov2"
        assert row["ours"] == row["provider"].startswith("patched")
        if row["provider"].endswith("+compile"):  # torch.compile on the CPU only with --compile
            assert row["status"] == "skipped" and "slow to compile" in row["note"]
            continue
        assert row["status"] == "ok" and row["check"] == "ok", row
        assert row["ms"] > 0 and row["images_per_s"] == pytest.approx(2 / (row["ms"] * 1e-3))
        assert 0 < row["max_rel_err"] < bench.TOLERANCE[torch.bfloat16]
        assert row["first_call_s"] > 0 and row["params"] > 0 and row["params_MiB"] > 0
        assert row["peak_MiB"] is None and row["graph_ms"] is None  # CUDA only
        assert row["baseline"] == "unpatched" and row["speedup"] > 0
    patched = [r for r in results if r["provider"] == "patched"]
    depth = bench.CPU_DEPTH  # every block, attention and LayerNorm (2 a block and the final one)
    for what in (f"{2 * depth + 1} layer_norm", f"{depth} attention", f"{depth} block", "left 0"):
        assert all(what in r["patch"] for r in patched), patched[0]["patch"]
    assert patched[0]["patch"] in done.stdout
    assert main(["report", str(path)]) == 0
    assert "vit_small depth 2 dinov2 2x28px" in capsys.readouterr().out
    assert main(["report", str(path), "--headline"]) == 0
    assert "model: no numbers to hold against the targets (not a GPU run)" in (
        capsys.readouterr().out
    )


# --- the stock block is DINOv2's ------------------------------------------------------------------


def _stock_and_reference(drop_path: float) -> tuple[bench.StockDinoBlock, RefBlock]:
    """The stock block and DINOv2's, float64, with the same random weights (gammas near 1)."""
    stock = bench.StockDinoBlock(
        DIM,
        HEADS,
        qkv_bias=True,
        init_values=1e-5,
        drop_path=drop_path,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    ).double()
    with torch.no_grad():
        for name, param in stock.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("weight") and param.dim() == 2:
                param.normal_(0.0, param.shape[1] ** -0.5)
            else:
                param.normal_(0.0, 0.5)
    reference = RefBlock(
        DIM, HEADS, qkv_bias=True, init_values=1e-5, drop_path=drop_path, ffn_layer=RefMlp, eps=1e-6
    ).double()
    assert list(stock.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(stock.state_dict())
    return stock, reference


@pytest.mark.parametrize(
    "drop_path, training",
    [(0.0, False), (0.4, False), (0.4, True), (0.05, True), (0.0, True)],
    ids=["eval", "eval-p0.4", "subset-p0.4", "mask-p0.05", "train-p0"],
)
def test_stock_block_matches_dinov2(drop_path, training):
    stock, reference = _stock_and_reference(drop_path)
    assert stock.sample_drop_ratio == drop_path
    x = torch.randn(6, 5, DIM, dtype=torch.float64)
    outs, grads = [], []
    for block in (stock, reference):
        block.train(training)
        leaf = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same draws (randperm, bernoulli) for both
        out = block(leaf)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_stock_model_matches_dinov2_s_model(training):
    """The whole unpatched model against DINOv2's (float64, same weights and draws)."""
    config = bench.Config("vit_small", 4, 42, 0.4, "dinov2", depth=2)
    stock = bench.build_stock(config, torch.device("cpu")).double()
    reference = RefDinoVisionTransformer(
        img_size=42,
        patch_size=14,
        embed_dim=384,
        depth=2,
        num_heads=6,
        drop_path_rate=0.4,
        drop_path_uniform=True,
        init_values=1e-5,
        block_chunks=0,
    ).double()
    weights = stock.state_dict()
    for key in weights:
        if key.endswith("gamma"):
            weights[key] = 0.5 + torch.rand_like(weights[key])  # the blocks show in the output
    stock.load_state_dict(weights)
    reference.load_state_dict(weights)
    images = torch.randn(4, 3, 42, 42, dtype=torch.float64)
    outs = []
    for model in (stock, reference):
        model.train(training)
        torch.manual_seed(5)
        out = model.forward_features(images)
        outs.append(torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)


def test_stock_block_refuses_dropout():
    with pytest.raises(ValueError, match="drop must be 0"):
        bench.StockDinoBlock(DIM, HEADS, drop=0.1)
    with pytest.raises(ValueError, match="attn_drop must be 0"):
        bench.StockDinoBlock(DIM, HEADS, attn_drop=0.1)


def test_stock_model_is_dinov2_s_training_configuration():
    config = bench.Config("vit_small", 2, 28, 0.3, "dinov2", depth=3)
    model = bench.build_stock(config, torch.device("cpu"))
    assert len(model.blocks) == 3 and model.embed_dim == 384 and model.patch_size == 14
    assert all(isinstance(block, bench.StockDinoBlock) for block in model.blocks)
    assert [block.sample_drop_ratio for block in model.blocks] == [0.3] * 3  # uniform
    assert all(block.ls1.gamma.eq(1e-5).all() for block in model.blocks)
    assert type(model.norm) is torch.nn.LayerNorm and model.norm.eps == 1e-6
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 384)


# --- timm ----------------------------------------------------------------------------------------


def test_timm_source_runs_patched_and_unpatched():
    pytest.importorskip("timm")
    options = bench.Options(source="timm")
    report = benchmark.run(
        ["model"], device=torch.device("cpu"), quick=True, shapes={"model": [options]}
    )
    timed = [r for r in report["results"] if r["status"] == "ok"]
    assert {(r["provider"], r["pass"]) for r in timed} == {
        (name, pass_) for name in ("unpatched", "patched") for pass_ in bench.PASSES
    }
    for row in timed:
        assert row["source"] == "timm" and row["check"] == "ok", row
        assert "timm" in row["shape"]
    assert "left 0" in timed[-1]["patch"]
    config = options.resolve(quick=True, on_gpu=False)
    model = bench.build_stock(config, torch.device("cpu"))
    rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in model.blocks]
    assert rates == [(0.4, 0.4)] * bench.CPU_DEPTH  # uniform, not timm's ramp from 0


def test_timm_missing_is_a_skip_not_an_error(monkeypatch):
    real = common._library_missing
    monkeypatch.setattr(common, "_library_missing", lambda name: name == "timm" or real(name))
    config = bench.Options(source="timm").resolve(quick=True, on_gpu=False)
    for provider in bench.PROVIDERS[:2]:
        status = bench.provider_status(provider, torch.device("cpu"), torch.bfloat16, config)
        assert status == ("skipped", "timm is not installed")
    dinov2 = bench.Options().resolve(quick=True, on_gpu=False)
    status = bench.provider_status(bench.PROVIDERS[0], torch.device("cpu"), torch.bfloat16, dinov2)
    assert status == ("ok", "")


# --- options -------------------------------------------------------------------------------------


def test_options_resolve_to_the_mode_s_defaults_and_keep_what_was_given():
    gpu = bench.Options().resolve(quick=False, on_gpu=True)
    assert gpu == bench.Config("vit_large", 32, 224, 0.4, "dinov2", depth=None)
    assert gpu.tokens == 257 and gpu.name == "vit_large dinov2 32x224px"
    cpu = bench.Options().resolve(quick=False, on_gpu=False)
    assert cpu == bench.Config("vit_large", 2, 56, 0.4, "dinov2", depth=bench.CPU_DEPTH)
    quick = bench.Options().resolve(quick=True, on_gpu=True)
    assert quick == bench.Config("vit_small", 2, 28, 0.4, "dinov2", depth=bench.CPU_DEPTH)
    given = bench.Options("vit_base", 8, 98, 0.0, "timm")
    assert given.resolve(quick=False, on_gpu=True) == bench.Config("vit_base", 8, 98, 0.0, "timm")
    assert given.resolve(quick=True, on_gpu=False).depth == bench.CPU_DEPTH
    assert not bench.Options().given() and bench.Options(batch=4).given()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "model", "--arch", "vit_huge"], "invalid choice"),
        (["bench", "model", "--source", "hub"], "invalid choice"),
        (["bench", "model", "--img-size", "225"], "multiple of the patch size 14"),
        (["bench", "model", "--batch", "0"], "--batch must be at least 1"),
        (["bench", "model", "--drop-path", "1"], "--drop-path must be in [0, 1)"),
        (["bench", "model", "--batch", "two"], "invalid int value"),
        (["bench", "layernorm", "--arch", "vit_small"], "configure the model benchmark only"),
        (["bench", "model", "--shapes", "32x224"], "not --shapes"),
    ],
)
def test_bad_options_exit_with_a_message(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


def test_shapes_without_names_leave_the_model_out():
    with pytest.raises(ValueError, match="not --shapes"):
        bench.parse_shapes("16448x1024")


# --- the headline ---------------------------------------------------------------------------------


def _made_up_record(provider: str, pass_: str, ms: float, mib: float, check: str = "ok"):
    config = bench.Options().resolve(quick=False, on_gpu=True)
    by_name = {p.name: p for p in bench.PROVIDERS}
    record = bench._record(
        by_name[provider],
        config,
        pass_,
        "ok",
        torch.bfloat16,
        ms=ms,
        images_per_s=config.batch / (ms * 1e-3),
        peak_MiB=mib,
        max_rel_err=1e-2,
        check=check,
    )
    return record


def test_headline_compares_patched_with_unpatched_and_compiled(tmp_path, capsys):
    """From a made-up GPU report (not measured numbers)."""
    records = [
        _made_up_record("unpatched", "inference", 40.0, 2000.0),
        _made_up_record("unpatched", "train", 200.0, 20000.0),
        _made_up_record("patched", "inference", 32.0, 1800.0),
        _made_up_record("patched", "train", 125.0, 12000.0, check="MISMATCH"),
        _made_up_record("unpatched+compile", "inference", 36.0, 1900.0),
        _made_up_record("unpatched+compile", "train", 150.0, 15000.0),
    ]
    bench._finish(records)  # the order and the speedups, as the benchmark computes them
    assert [(r["provider"], r["pass"]) for r in records[:3]] == [
        ("unpatched", "inference"),
        ("unpatched", "train"),
        ("patched", "inference"),
    ]
    assert records[2]["speedup"] == pytest.approx(40.0 / 32.0)
    path = _made_up_gpu_report(tmp_path, "model", records)
    assert main(["report", str(path), "--headline"]) == 0
    lines = [line.replace("│", " ") for line in capsys.readouterr().out.splitlines()]

    def row(pass_: str, provider: str) -> str:
        return next(line for line in lines if line.split()[:2] == [pass_, provider])

    inference = row("inference", "patched")
    assert "1.25x" in inference and "1.12x" in inference and "0.90x" in inference  # 36/32, mem
    train = row("train", "patched")
    assert "1.60x" in train and "1.20x" in train and "0.60x" in train and "MISMATCH" in train
    assert "ViT-L/14 (vit_large, dinov2)" in "\n".join(lines)
    assert bench.headline([r for r in records if r["provider"].startswith("unpatched")]) is None


# --- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_records_have_graph_times_and_peak_memory():
    device = torch.device("cuda", torch.cuda.current_device())
    context = benchmark.BenchContext(
        device, torch.bfloat16, True, Timer.for_device(device, quick=True), 1000.0
    )
    config = bench.Options().resolve(quick=True, on_gpu=True)
    models = bench.Models(config, device)
    for provider in bench.PROVIDERS[:2]:
        records = bench._measure(context, provider, config, models)
        assert [r["pass"] for r in records] == list(bench.PASSES)
        for record in records:
            assert record["status"] == "ok" and record["check"] == "ok", record
            assert record["peak_MiB"] > 0 and record["peak_total_MiB"] > record["peak_MiB"]
            assert record["graph_ms"] is not None or "capture failed" in record["note"], record
