"""The measured table behind backend="auto" (dinov2_fast/backend_table.py): shape classes, table
files and which one applies, choose(), resolve() consulting it, the ops passing their shape
class, and the shipped H100 defaults. No GPU: the device's name and capability are faked."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from dinov2_fast import _backend, backend_table, ops
from dinov2_fast.backend_table import shape_class

REPO = Path(__file__).resolve().parents[1]
H100 = ("NVIDIA H100 80GB HBM3", "9.0")
H200 = ("NVIDIA H200", "9.0")
A100 = ("NVIDIA A100-SXM4-80GB", "8.0")
LN_CLASS = "C<=1024,rows>8192,bf16"


@pytest.fixture(autouse=True)
def isolated_tables(tmp_path, monkeypatch):
    """No user table of this machine and no DINOV2_FAST_BACKEND_TABLE leak in; tables reread."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(backend_table.ENV_TABLE, raising=False)
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    backend_table.reload()
    yield
    backend_table.reload()


def _table(device=H100, ops_: dict | None = None, **fields) -> dict:
    name, capability = device
    return {
        "format": 1,
        "device": name,
        "compute_capability": capability,
        "ops": ops_ if ops_ is not None else {},
        **fields,
    }


def _measured(graph_ms=None, eager_ms=None, shape="16448x1024") -> dict:
    record: dict = {"shape": shape, "pass": "fwd+bwd"}
    if graph_ms is not None:
        record["graph_ms"] = graph_ms
    if eager_ms is not None:
        record["eager_ms"] = eager_ms
    return record


def _use(tmp_path, monkeypatch, table: dict, name: str = "table.json") -> Path:
    path = backend_table.write(table, tmp_path / name)
    monkeypatch.setenv(backend_table.ENV_TABLE, str(path))
    backend_table.reload()
    return path


# --- shape classes -------------------------------------------------------------------------------


def test_attention_classes_bucket_head_dim_sequence_layout_and_dtype():
    def cls(seqlen, packed=False, head_dim=64, dtype=torch.bfloat16):
        return shape_class(
            "attention", head_dim=head_dim, seqlen=seqlen, packed=packed, dtype=dtype
        )

    assert cls(257) == "D=64,N<=320,dense,bf16"
    assert cls(37, packed=True) == "D=64,N<=320,packed,bf16"
    assert cls(320) == "D=64,N<=320,dense,bf16" and cls(321) == "D=64,N<=1400,dense,bf16"
    assert cls(1370) == "D=64,N<=1400,dense,bf16" and cls(1401) == "D=64,N>1400,dense,bf16"
    assert cls(4096, head_dim=128, dtype=torch.float16) == "D=128,N>1400,dense,fp16"


def test_row_classes_bucket_width_rows_and_dtypes():
    def norm(width, rows, dtype=torch.bfloat16, out_dtype=None):
        return shape_class("layer_norm", width=width, rows=rows, dtype=dtype, out_dtype=out_dtype)

    assert norm(384, 16448) == "C<=512,rows>8192,bf16"
    assert norm(768, 8192) == "C<=1024,rows<=8192,bf16"
    assert norm(1024, 8193) == "C<=1024,rows>8192,bf16"
    assert norm(1536, 100, torch.float32, torch.bfloat16) == "C>1024,rows<=8192,fp32->bf16"
    assert norm(1536, 100, torch.float32, torch.float32) == "C>1024,rows<=8192,fp32"
    assert (
        shape_class("index_select_cat", width=1024, rows=17416, dtype=torch.float32)
        == "C<=1024,rows>8192,fp32"
    )
    add = shape_class(
        "scaled_index_add",
        width=1024,
        rows=16448,
        dtype=torch.float32,
        source_dtype=torch.bfloat16,
    )
    assert add == "C<=1024,rows>8192,fp32+bf16"
    assert shape_class("index_select_layer_norm", width=1, rows=1, dtype=torch.float16) == (
        "C<=512,rows<=8192,fp16"
    )


def test_shape_class_errors_name_the_op_or_the_size():
    with pytest.raises(ValueError, match="op must be one of .*'prototype_cross_entropy'"):
        shape_class("prototype_cross_entropy", rows=1)
    with pytest.raises(TypeError, match="head_dim"):
        shape_class("attention", seqlen=1, packed=False, dtype=torch.float16)


# --- table files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, words",
    [
        ({"format": 2}, "format must be 1"),
        ({"device": ""}, "device must name the GPU"),
        ({"ops": []}, "ops must be an object"),
        ({"ops": {"layer_norm": {LN_CLASS: {}}}}, "must be a list of measurements"),
        ({"ops": {"layer_norm": {LN_CLASS: [{"graph_ms": {"cuda": 0}}]}}}, "must be positive"),
        ({"ops": {"layer_norm": {LN_CLASS: [{"eager_ms": {"cuda": "1"}}]}}}, "must be a number"),
        ({"ops": {"layer_norm": {LN_CLASS: [{"others": {"F": 3}}]}}}, "must be an object"),
    ],
)
def test_a_malformed_table_is_refused_naming_the_file(tmp_path, change, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**_table(), **change}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + words):
        backend_table.load(path)


def test_write_then_load_round_trips_and_validates(tmp_path):
    table = _table(ops_={"layer_norm": {LN_CLASS: [_measured({"triton": 0.1, "cuda": 0.2})]}})
    path = backend_table.write(table, tmp_path / "deep" / "t.json")
    assert backend_table.load(path).data == table
    with pytest.raises(ValueError, match="format must be 1"):
        backend_table.write({**table, "format": 0}, tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


def test_the_user_table_path_is_per_gpu_under_the_cache_dir(tmp_path):
    path = backend_table.user_table_path("NVIDIA H100 80GB HBM3")
    assert path == tmp_path / "cache" / "dinov2_fast" / "backend_table-NVIDIA_H100_80GB_HBM3.json"


# --- choose --------------------------------------------------------------------------------------


def test_the_fastest_measured_available_backend_wins(tmp_path, monkeypatch):
    _use(
        tmp_path,
        monkeypatch,
        _table(
            ops_={
                "layer_norm": {
                    LN_CLASS: [
                        _measured({"triton": 0.10, "cuda": 0.06, "torch": 0.20}),
                        _measured({"triton": 0.10, "cuda": 0.06, "torch": 0.20}, shape="x"),
                    ],
                    "C<=512,rows>8192,bf16": [_measured(eager_ms={"triton": 1.0, "cuda": 0.5})],
                }
            }
        ),
    )
    everything = ("triton", "cuda", "torch")
    assert backend_table.choose("layer_norm", LN_CLASS, everything, *H100) == "cuda"
    # Only the backends that run here compete; none measured: no decision.
    assert backend_table.choose("layer_norm", LN_CLASS, ("triton", "torch"), *H100) == "triton"
    assert backend_table.choose("layer_norm", LN_CLASS, ("torch",), *H100) == "torch"
    assert backend_table.choose("layer_norm", LN_CLASS, (), *H100) is None
    # Eager times are a record, not compared: the host's launch cost is in them.
    assert backend_table.choose("layer_norm", "C<=512,rows>8192,bf16", everything, *H100) is None
    assert backend_table.choose("layer_norm", "C>1024,rows>8192,bf16", everything, *H100) is None
    assert backend_table.choose("attention", LN_CLASS, everything, *H100) is None


def test_a_near_tie_goes_to_the_earlier_backend_in_preference_order(tmp_path, monkeypatch):
    measured = _measured({"triton": 0.102, "cuda": 0.100, "torch": 0.5})
    _use(tmp_path, monkeypatch, _table(ops_={"layer_norm": {LN_CLASS: [measured]}}))
    # 2% apart is within TIE_FRACTION (3%): the preference order decides.
    assert backend_table.choose("layer_norm", LN_CLASS, ("triton", "cuda"), *H100) == "triton"
    assert backend_table.choose("layer_norm", LN_CLASS, ("cuda", "triton"), *H100) == "cuda"


def test_a_backend_missing_from_one_of_the_class_measurements_is_not_compared(
    tmp_path, monkeypatch
):
    records = [_measured({"triton": 0.3, "cuda": 0.1}), _measured({"triton": 0.3}, shape="y")]
    _use(tmp_path, monkeypatch, _table(ops_={"layer_norm": {LN_CLASS: records}}))
    assert backend_table.choose("layer_norm", LN_CLASS, ("triton", "cuda"), *H100) == "triton"


def test_a_table_applies_to_its_gpu_and_its_architecture_only(tmp_path, monkeypatch):
    measured = {"layer_norm": {LN_CLASS: [_measured({"triton": 0.2, "cuda": 0.1})]}}
    _use(tmp_path, monkeypatch, _table(H100, measured))
    for device in (H100, H200, ("NVIDIA H100 80GB HBM3", None)):
        assert backend_table.choose("layer_norm", LN_CLASS, ("triton", "cuda"), *device) == "cuda"
    with pytest.warns(UserWarning, match="it does not apply to NVIDIA A100"):
        assert backend_table.choose("layer_norm", LN_CLASS, ("triton", "cuda"), *A100) is None


def test_the_environment_table_then_the_user_table_then_the_shipped_one(tmp_path, monkeypatch):
    sd_class = "C<=1024,rows>8192,bf16"
    user = _table(
        ops_={
            "layer_norm": {LN_CLASS: [_measured({"triton": 0.2, "torch": 0.1})]},
            "index_select_cat": {sd_class: [_measured({"triton": 0.9, "torch": 0.1})]},
        }
    )
    backend_table.write(user, backend_table.user_table_path(H100[0]))
    backend_table.reload()
    both = ("triton", "torch")
    assert backend_table.choose("layer_norm", LN_CLASS, both, *H100) == "torch"
    assert backend_table.choose("index_select_cat", sd_class, both, *H100) == "torch"
    # The shipped H100 defaults decide the classes the user's table does not have.
    assert backend_table.choose("index_select_cat", "C<=1024,rows>8192,fp32", both, *H100) == (
        "triton"
    )
    # The user's table is per GPU name: another Hopper GPU reads only the shipped defaults.
    assert backend_table.choose("index_select_cat", sd_class, both, *H200) == "triton"
    env = _table(ops_={"layer_norm": {LN_CLASS: [_measured({"triton": 0.1, "torch": 0.2})]}})
    _use(tmp_path, monkeypatch, env)
    assert backend_table.choose("layer_norm", LN_CLASS, both, *H100) == "triton"
    assert backend_table.choose("index_select_cat", sd_class, both, *H100) == "torch"  # user's
    origins = [table.origin for table in backend_table.tables_for(*H100)]
    assert origins[0].endswith("table.json") and origins[-1].endswith("backend_table_h100.json")
    monkeypatch.setenv(backend_table.ENV_TABLE, "off")
    backend_table.reload()
    assert backend_table.tables_for(*H100) == ()
    assert backend_table.choose("layer_norm", LN_CLASS, both, *H100) is None


def test_an_unreadable_table_warns_and_auto_keeps_its_fixed_order(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(backend_table.ENV_TABLE, str(bad))
    backend_table.reload()
    with pytest.warns(UserWarning, match="backend table not used.*not JSON"):
        tables = backend_table.tables_for(*H100)
    assert [table.origin for table in tables] == [str(backend_table.shipped_path())]
    monkeypatch.setenv(backend_table.ENV_TABLE, str(tmp_path / "missing.json"))
    backend_table.reload()
    with pytest.warns(UserWarning, match="missing.json"):
        backend_table.tables_for(*H100)


# --- the shipped defaults ------------------------------------------------------------------------

CLASS_FORM = re.compile(
    r"^(D=\d+,N(<=320|<=1400|>1400),(dense|packed),\w+"
    r"|C(<=512|<=1024|>1024),rows(<=8192|>8192),\w+((->|\+)\w+)?)$"
)


def test_the_shipped_table_is_valid_and_only_holds_measured_backends():
    table = backend_table.load(backend_table.shipped_path())
    assert table.device == H100[0] and table.compute_capability == H100[1]
    assert table.data["date"] and table.data["notes"] and table.data["torch"]
    for op, classes in table.data["ops"].items():
        for name, records in classes.items():
            assert CLASS_FORM.match(name), name
            for record in records:
                assert record["shape"] and record["pass"].startswith("fwd+bwd")
                for key in ("graph_ms", "eager_ms"):
                    assert set(record.get(key, {})) <= set(_backend.AUTO_PREFERENCE[op]), record


def test_the_defaults_copied_from_results_md_say_where_each_number_is_from():
    table = backend_table.load(backend_table.shipped_path()).data
    if "RESULTS.md" not in table["source"]:
        pytest.skip("the shipped table was regenerated by `dinov2-fast bench tune`")
    results = (REPO / "bench" / "RESULTS.md").read_text()
    for classes in table["ops"].values():
        for records in classes.values():
            for record in records:
                assert "bench/RESULTS.md run" in record["source"]
                # The CUDA kernels of attention and stochastic depth were not measured then.
                assert "cuda" not in record.get("graph_ms", {})
                for ms in {**record.get("graph_ms", {}), **record.get("eager_ms", {})}.values():
                    assert f"{ms:.3f}" in results or f"{ms:.4f}" in results, ms
    assert any("host-bound" in note for note in table["notes"])
    # Eager-only rows decide nothing: on the H100, auto keeps its order for these ops.
    for op in ("attention", "layer_norm"):
        for name in table["ops"][op]:
            assert backend_table.choose(op, name, ("triton", "cuda", "torch"), *H100) is None
    assert (
        backend_table.choose(
            "index_select_cat", "C<=1024,rows>8192,bf16", ("triton", "torch"), *H100
        )
        == "triton"
    )
    assert backend_table.choose(
        "index_select_cat", "C<=1024,rows>8192,bf16", ("torch",), *A100
    ) is (None)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_the_shipped_table_is_package_data():
    import fnmatch

    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["dinov2_fast"]
    for name in backend_table.SHIPPED_TABLES:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
        assert (REPO / "dinov2_fast" / name).is_file()


# --- resolve and the ops -------------------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """cuda:0 is an H100 where every backend runs (as far as resolve can tell)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: H100[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(_backend, "unavailable_reason", lambda backend, device: "")
    backend_table.reload()
    return torch.device("cuda", 0)


def test_resolve_auto_on_cuda_takes_the_table_s_choice(tmp_path, monkeypatch, fake_gpu):
    measured = _measured({"triton": 0.3, "cuda": 0.2, "torch": 0.1})
    _use(tmp_path, monkeypatch, _table(ops_={"layer_norm": {LN_CLASS: [measured]}}))
    assert _backend.resolve("layer_norm", "auto", fake_gpu, LN_CLASS) == "torch"
    # No class, or a class the table lacks: the fixed order, as before the table.
    first = _backend.AUTO_PREFERENCE["layer_norm"][0]
    assert _backend.resolve("layer_norm", "auto", fake_gpu) == first
    assert _backend.resolve("layer_norm", "auto", fake_gpu, "C>1024,rows>8192,bf16") == first
    # A backend named by the caller or by DINOV2_FAST_BACKEND is not second-guessed.
    assert _backend.resolve("layer_norm", "cuda", fake_gpu, LN_CLASS) == "cuda"
    monkeypatch.setenv(_backend.ENV_BACKEND, "triton")
    assert _backend.resolve("layer_norm", "auto", fake_gpu, LN_CLASS) == "triton"
    # CPU tensors: the torch reference, whatever the table says.
    assert _backend.resolve("layer_norm", "auto", torch.device("cpu"), LN_CLASS) == "torch"


def test_each_op_passes_its_shape_class_to_resolve(monkeypatch):
    seen: list[tuple[str, str | None]] = []
    real = _backend.resolve

    def spy(op, backend, device, shape_class=None):
        seen.append((op, shape_class))
        return real(op, backend, device, shape_class)

    monkeypatch.setattr(_backend, "resolve", spy)
    x = torch.randn(3, 5, 384)
    ops.layer_norm(x, torch.ones(384), torch.zeros(384))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ops.layer_norm(x, torch.ones(384), torch.zeros(384))
    qkv = torch.randn(2, 257, 3, 2, 64, dtype=torch.bfloat16)
    ops.attention_qkvpacked(qkv)
    mask = ops.BlockDiagonalMask([50, 257, 37])
    q = torch.randn(1, mask.total, 2, 128, dtype=torch.float16)
    ops.memory_efficient_attention(q, q, q, attn_bias=mask)
    sources = [torch.randn(4, 5, 96), torch.randn(2, 3, 96)]
    indices = [torch.tensor([0, 3]), torch.tensor([1])]
    ops.index_select_cat(sources, indices)
    ops.index_select_layer_norm(sources, indices, torch.ones(96), torch.zeros(96))
    stream = torch.randn(4, 5, 1536)
    ops.scaled_index_add(stream, indices[0], torch.randn(2, 5, 1536, dtype=torch.bfloat16))
    assert seen == [
        ("layer_norm", "C<=512,rows<=8192,fp32"),
        ("layer_norm", "C<=512,rows<=8192,fp32->bf16"),
        ("attention", "D=64,N<=320,dense,bf16"),
        ("attention", "D=128,N<=320,packed,fp16"),
        ("index_select_cat", "C<=512,rows<=8192,fp32"),  # 2 x 5 + 1 x 3 gathered rows
        ("index_select_layer_norm", "C<=512,rows<=8192,fp32"),
        ("scaled_index_add", "C>1024,rows<=8192,fp32+bf16"),
    ]


def test_ops_with_auto_compile_without_graph_breaks_at_dynamic_shapes():
    """The shape class is computed from sizes that are symbolic when marked dynamic: only
    comparisons (guards), no graph break; resolve stays a constant of the trace."""
    torch._dynamo.reset()

    def step(x, weight, bias, qkv, index, source):
        y = ops.layer_norm(x, weight, bias)
        out = ops.attention_qkvpacked(qkv)
        added = ops.scaled_index_add(x.view(4, -1, 64), index, source, validate=False)
        gathered = ops.index_select_cat([x.view(4, -1, 64)], [index], validate=False)
        return y.sum() + out.sum() + added.sum() + gathered.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for rows in (12, 20):
        args = (
            torch.randn(rows, 64),
            torch.ones(64),
            torch.zeros(64),
            torch.randn(2, rows, 3, 2, 64),
            torch.tensor([0, 2]),
            torch.randn(2, rows // 4, 64),
        )
        for tensor, dim in ((args[0], 0), (args[3], 1), (args[5], 1)):
            torch._dynamo.mark_dynamic(tensor, dim)  # rows and tokens: symbolic sizes
        torch.testing.assert_close(compiled(*args), step(*args), rtol=1e-4, atol=1e-3)
    torch._dynamo.reset()
