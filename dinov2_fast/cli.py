"""The ``dinov2-fast`` command.

    dinov2-fast info [--json PATH]
        versions, GPUs, which backends run on CUDA and CPU tensors (and why not), optional libraries
    dinov2-fast bench [NAME ...] [--json PATH] [--shapes SHAPES] [--dtype bf16|fp16|fp32]
                      [--device cuda|cpu] [--quick] [--compile] [--time-limit S] [--quiet]
                      [--arch ARCH] [--batch B] [--img-size PX] [--drop-path P] [--source SRC]
                      [--plot PATH]
        time dinov2-fast's ops against torch and other libraries (no NAME: every benchmark, or
        with --shapes every benchmark whose form of shapes it is); --arch to --drop-path
        configure the model and train-step benchmarks, --source the model benchmark only, --plot
        (a bar chart: png, pdf or svg) the train-step benchmark only
    dinov2-fast bench tune [--out PATH | --ship] [--dtype bf16|fp16|fp32] [--time-limit S]
                           [--quick] [--plan] [--quiet]
        time every op's backends at each shape class on this GPU and write the table that
        backend="auto" chooses by (default: the per-user cache file of this GPU; --ship: the
        H100 defaults shipped in the package, from a checkout); --plan lists what it would time
    dinov2-fast report PATH [--headline]
        print the tables of a report that ``bench --json`` wrote
    dinov2-fast train [--config demo|vits14|vitb14|vitl14|vitg14|FILE] [--data DIR] [--impl ...]
                      [--output-dir DIR] [--max-steps N] [--resume] [key=value ...]
        DINOv2 self-supervised training (dinov2_fast.train.cli)
    dinov2-fast eval knn --checkpoint PATH [--data DIR]
        k-NN accuracy of a trained teacher

``--json -`` writes the JSON to stdout instead of the tables. Tables use ``rich`` when it is
installed (``pip install dinov2-fast[bench]``) and plain aligned text otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main"]


# --- output --------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _write_json(data: dict[str, Any], path: str) -> None:
    text = json.dumps(_json_safe(data), indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def _render(table: Any, out: TextIO | None = None) -> None:
    """Print a :class:`dinov2_fast.benchmark.Table`: with rich when importable, else plain text."""
    out = sys.stdout if out is None else out
    try:
        from rich.console import Console
        from rich.table import Table as RichTable
        from rich.text import Text
    except ImportError:
        _render_plain(table, out)
        return
    console = Console(file=out)
    if not console.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        console = Console(file=out, width=max(shutil.get_terminal_size().columns, 200))
    rich_table = RichTable(title=table.title, title_justify="left")
    for column in table.columns:
        rich_table.add_column(column, overflow="fold")
    for row in table.rows:
        rich_table.add_row(*(Text(cell) for cell in row))
    console.print(rich_table)
    for note in table.notes:
        console.print(Text(f"  {note}"))


def _render_plain(table: Any, out: TextIO) -> None:
    cells = [table.columns, *table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.columns))]

    def numeric(text: str) -> bool:
        return text.rstrip("x%").replace(".", "", 1).replace("e-", "", 1).lstrip("-").isdigit()

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if numeric(cell) else cell.ljust(width)
            for cell, width in zip(row, widths)
        ]
        return "  ".join(parts).rstrip()

    out.write(f"{table.title}\n")
    out.write(line(table.columns) + "\n")
    out.write("  ".join("-" * width for width in widths) + "\n")
    for row in table.rows:
        out.write(line(row) + "\n")
    for note in table.notes:
        out.write(f"  {note}\n")
    out.write("\n")


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


# --- info ----------------------------------------------------------------------------------------


def _info_data() -> dict[str, Any]:
    from dinov2_fast import _backend, _environment

    return {
        "versions": _environment.versions(),
        "gpus": _environment.gpus(),
        "backends": _environment.backend_status(),
        "triton_interpreted": _backend.triton_interpreted(),
        "optional_libraries": _environment.optional_libraries(),
        "environment": _environment.environment_variables(),
        "backend_tables": _backend_tables(),
    }


def _backend_tables() -> dict[str, Any]:
    """The tables backend='auto' reads on each GPU, first the one that wins (backend_table)."""
    from dinov2_fast import _environment, backend_table

    return {
        "shipped": [str(backend_table.shipped_path(name)) for name in backend_table.SHIPPED_TABLES],
        "gpus": [
            {
                "index": gpu["index"],
                "user_table": str(backend_table.user_table_path(gpu["name"])),
                "tables": [
                    {"path": table.origin, "device": table.device, "date": table.data.get("date")}
                    for table in backend_table.tables_for(gpu["name"], gpu["compute_capability"])
                ],
            }
            for gpu in _environment.gpus()
        ],
    }


def _print_info(data: dict[str, Any]) -> None:
    def usable(why: str) -> str:
        return "yes" if not why else f"no: {why}"

    print("versions")
    for name, version in data["versions"].items():
        print(f"  {name:<18} {version if version is not None else 'not installed'}")
    print("GPUs")
    if not data["gpus"]:
        print("  no CUDA GPU")
    for gpu in data["gpus"]:
        print(
            f"  cuda:{gpu['index']}  {gpu['name']}, compute capability "
            f"{gpu['compute_capability']}, {gpu['sm_count']} SMs, {gpu['memory_GiB']} GiB"
        )
    print("backends of dinov2_fast.ops")
    for backend, where in data["backends"].items():
        print(f"  {backend:<7} CUDA tensors: {usable(where['cuda'])}")
        print(f"  {'':<7} CPU tensors:  {usable(where['cpu'])}")
    if data["triton_interpreted"]:
        print("  (TRITON_INTERPRET=1: Triton kernels run in the interpreter on CPU tensors)")
    tables = data["backend_tables"]
    print("measured tables of backend='auto' (dinov2-fast bench tune writes them)")
    for gpu in tables["gpus"]:
        print(f"  cuda:{gpu['index']}  the user's table: {gpu['user_table']}")
        for table in gpu["tables"] or [{"path": "none applies: the fixed order"}]:
            measured = f" ({table['device']}, {table['date']})" if "device" in table else ""
            print(f"         {table['path']}{measured}")
    if not tables["gpus"]:
        print(f"  no CUDA GPU; shipped: {', '.join(tables['shipped'])}")
    print("optional comparison libraries")
    for name, version in data["optional_libraries"].items():
        print(f"  {name:<18} {version if version is not None else 'not installed'}")
    if data["environment"]:
        print("environment")
        for name, value in data["environment"].items():
            print(f"  {name}={value}")


def _cmd_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    data = _info_data()
    if args.json != "-":
        _print_info(data)
    if args.json:
        _write_json(data, args.json)
    return 0


# --- bench and report ----------------------------------------------------------------------------


def _print_report(report: dict[str, Any], *, headline_only: bool = False) -> None:
    from dinov2_fast import benchmark

    print(
        f"device: {report['device']}; torch {report['torch']}, triton {report['triton']}; "
        f"dtype {report['dtype']}; copy bandwidth {report['copy_bandwidth_GBps']} GB/s "
        f"(read + written); {report['date']}"
    )
    names = report.get("benchmarks") or sorted({r["benchmark"] for r in report["results"]})
    for name in names:
        try:
            bench = benchmark.get(name)
        except ValueError:
            print(f"{name}: no such benchmark in this version of dinov2-fast; see the JSON")
            continue
        results = [r for r in report["results"] if r["benchmark"] == name]
        if not headline_only:
            _render(bench.table(results))
        # The targets are GPU numbers: a CPU run is never held against them.
        headline = bench.headline(results) if report.get("device_type") == "cuda" else None
        if headline is not None:
            _render(headline)
        elif headline_only:
            why = "not a GPU run" if report.get("device_type") != "cuda" else "no shape measured"
            print(f"{name}: no numbers to hold against the targets ({why})")
    for note in report.get("notes", []):
        print(f"note: {note}")


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from dinov2_fast import benchmark

    if TUNE in args.names:
        return _cmd_tune(args, parser)
    if args.out is not None or args.ship or args.plan:
        parser.error(f"--out, --ship and --plan are options of `dinov2-fast bench {TUNE}`")
    names = list(dict.fromkeys(args.names)) or list(benchmark.REGISTRY)
    for name in names:
        if name not in benchmark.REGISTRY:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(benchmark.REGISTRY)}")
    shapes = {}
    if args.shapes is not None:
        errors = []
        for name in names:
            try:
                shapes[name] = benchmark.get(name).parse_shapes(args.shapes)
            except ValueError as error:
                errors.append(str(error))
        # Named benchmarks must all take these shapes; without names, those that do are run.
        if errors and (args.names or not shapes):
            parser.error(f"--shapes: {'; '.join(errors)}")
        names = list(shapes)
    shapes.update(_sized_options(args, parser, names))
    if args.plot is not None:
        if "train-step" not in names:
            parser.error(
                "--plot draws the train-step benchmark: `dinov2-fast bench train-step ...`"
            )
        from dinov2_fast.benchmark import train_step

        try:
            train_step.check_plot_path(args.plot)
        except (ValueError, ImportError) as error:
            parser.error(str(error))
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time-limit must be a positive number of seconds, got {args.time_limit:g}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False)")
    if "train-step" in names:  # what it runs depends on the device: check it now
        options = shapes.get("train-step", [None])[0]
        try:
            from dinov2_fast.benchmark import train_step

            (options or train_step.Options()).resolve(
                quick=args.quick, on_gpu=args.device == "cuda"
            )
        except ImportError as error:
            parser.error(
                f"train-step needs the train extra (pip install 'dinov2-fast[train]'): {error}"
            )
        except ValueError as error:
            parser.error(str(error))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print(
            "no CUDA GPU in use: timing the torch paths on the CPU; the GPU kernels are NOT timed",
            file=sys.stderr,
        )
    report = benchmark.run(
        names,
        device=device,
        dtype=benchmark.DTYPES[args.dtype or "bf16"],
        quick=args.quick,
        shapes=shapes,
        compile_on_cpu=args.compile,
        progress=None if args.quiet else _progress,
        time_limit_s=args.time_limit,
    )
    if args.json != "-":
        _print_report(report)
    if args.json:
        _write_json(report, args.json)
        if args.json != "-":
            print(f"wrote {args.json}")
    if args.plot is not None:
        _plot_train_step(report, args.plot, quiet_stdout=args.json == "-")
    failed = [r for r in report["results"] if r["status"] == "error" or r["check"] == "MISMATCH"]
    for ours in (False, True):
        which = sorted({f"{r['benchmark']}/{r['provider']}" for r in failed if r["ours"] == ours})
        if which:
            whose = "dinov2-fast's own" if ours else "comparison"
            print(f"failed (error or MISMATCH), {whose}: {', '.join(which)}", file=sys.stderr)
    # Only our own kernels failing is a failure of the command; a comparison library may be broken.
    return 1 if any(r["ours"] for r in failed) else 0


# The benchmarks that take --arch, --batch, --img-size and --drop-path (model also --source).
_SIZED = ("model", "train-step")


def _sized_options(
    args: argparse.Namespace, parser: argparse.ArgumentParser, names: Sequence[str]
) -> dict[str, list[Any]]:
    """The options of the model and train-step benchmarks among ``names``, as their ``shapes``,
    for those given any; bad ones, or options for benchmarks not run, end in ``parser.error``."""
    from dinov2_fast.benchmark import model, train_step

    sizes = {
        "arch": args.arch,
        "batch": args.batch,
        "img_size": args.img_size,
        "drop_path": args.drop_path,
    }
    given = any(value is not None for value in sizes.values())
    if (given or args.source is not None) and not any(name in _SIZED for name in names):
        parser.error(
            "--arch, --batch, --img-size, --drop-path and --source configure the model benchmark "
            "only, and all but --source the train-step one: `dinov2-fast bench model ...` or "
            "`dinov2-fast bench train-step ...`"
        )
    if args.source is not None and "model" not in names:
        parser.error("--source configures the model benchmark only: `dinov2-fast bench model ...`")
    shapes: dict[str, list[Any]] = {}
    try:
        if "model" in names:
            options = model.Options(**sizes, source=args.source)
            if options.given():
                shapes["model"] = [options]
        if "train-step" in names and given:
            shapes["train-step"] = [train_step.Options(**sizes)]
    except ValueError as error:
        parser.error(str(error))
    return shapes


def _plot_train_step(report: dict[str, Any], path: str, *, quiet_stdout: bool) -> None:
    """The train-step bar chart of ``report`` at ``path``; says why when there is none."""
    from dinov2_fast.benchmark import train_step

    try:
        written = train_step.plot(report, path)
    except ValueError as error:
        print(f"no plot written: {error}", file=sys.stderr)
        return
    print(f"wrote {written}", file=sys.stderr if quiet_stdout else sys.stdout)


# `bench tune`: not a benchmark of the registry (it writes the table of backend="auto").
TUNE = "tune"
# The bench options tune takes; any other one given is an error rather than ignored.
_TUNE_OPTIONS = ("dtype", "device", "quick", "time_limit", "quiet", "out", "ship", "plan")


def _cmd_tune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from dinov2_fast import backend_table
    from dinov2_fast.benchmark import tune

    if args.names != [TUNE]:
        parser.error(f"bench {TUNE} runs alone, got: {' '.join(args.names)}")
    defaults = parser.parse_args(["bench"])  # what each option is when not given
    given = [
        "--" + name.replace("_", "-")
        for name, value in vars(args).items()
        if name not in (*_TUNE_OPTIONS, "names", "handler", "command")
        and value != getattr(defaults, name, value)
    ]
    if given:
        parser.error(
            f"bench {TUNE} takes --out, --ship, --plan, --dtype, --time-limit, --quick and "
            f"--quiet, not {', '.join(given)}"
        )
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time-limit must be a positive number of seconds, got {args.time_limit:g}")
    dtypes = [args.dtype] if args.dtype else list(tune.DEFAULT_DTYPES)
    measurements = tune.plan(dtypes, quick=args.quick)
    has_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if has_gpu else None
    if args.plan:
        _render(tune.plan_table(measurements, device))
        return 0
    if args.device == "cpu" or not has_gpu:
        why = "--device cpu" if args.device == "cpu" else "no CUDA GPU here"
        parser.error(
            f"bench {TUNE} needs a CUDA GPU: it times the GPU kernels ({why}); nothing was "
            f"written (`dinov2-fast bench {TUNE} --plan` lists what it would time)"
        )
    name = torch.cuda.get_device_name(device)
    if args.ship:
        target = backend_table.shipped_path()
        if not (target.parent.parent / ".git").exists():
            parser.error(
                f"--ship writes {target.name} into a source checkout; {target.parent} is an "
                "installed package: use --out PATH"
            )
        if "H100" not in name:
            parser.error(
                f"--ship writes the H100 defaults ({target.name}); this GPU is {name}: use "
                "--out PATH, or the default per-user table"
            )
    else:
        target = Path(args.out) if args.out is not None else backend_table.user_table_path(name)
    table = tune.run(
        device,
        dtypes=dtypes,
        quick=args.quick,
        time_limit_s=args.time_limit,
        progress=None if args.quiet else _progress,
        measurements=measurements,
    )
    _render(tune.summary_table(table, device))
    written = backend_table.write(table, target)
    backend_table.reload()  # this process's "auto" reads the new table too
    print(f"wrote {written} ({len(measurements) - len(table['not_measured'])} measurements)")
    if args.out is not None and not args.ship:
        print(
            f"backend='auto' reads it with {backend_table.ENV_TABLE}={written}, or copied to "
            f"{backend_table.user_table_path(name)}"
        )
    return 0


def _add_tune_options(bench: argparse.ArgumentParser) -> None:
    group = bench.add_argument_group(
        f"bench {TUNE}: the table of backend='auto'",
        "times every op's backends (triton, cuda, torch, where they run) forward+backward at "
        "DINOv2's shapes, one or more per shape class, as CUDA-graph replays, and writes the "
        "table that backend='auto' chooses by. Needs a CUDA GPU; about a minute on an H100.",
    )
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        metavar="PATH",
        help="write the table here (default: the per-user table of this GPU, "
        "~/.cache/dinov2_fast/backend_table-<GPU>.json, which auto reads)",
    )
    where.add_argument(
        "--ship",
        action="store_true",
        help="write the H100 defaults shipped in the package (dinov2_fast/backend_table_h100.json"
        "), from a source checkout on an H100",
    )
    group.add_argument(
        "--plan", action="store_true", help="list the measurements and exit (no GPU needed)"
    )


def _cmd_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        report = json.loads(Path(args.path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"cannot read a report from {args.path}: {error}")
    if not isinstance(report, dict) or "results" not in report:
        parser.error(f"{args.path} is not a report written by `dinov2-fast bench --json`")
    _print_report(report, headline_only=args.headline)
    return 0


# --- parser --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from dinov2_fast import __version__
    from dinov2_fast.benchmark import DTYPES, REGISTRY, get

    parser = argparse.ArgumentParser(
        prog="dinov2-fast",
        description="Fast, lean DINOv2-style ViT training: kernels, benchmarks, environment info.",
    )
    parser.add_argument("--version", action="version", version=f"dinov2-fast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = commands.add_parser(
        "info",
        help="versions, GPUs, usable backends, optional libraries",
        description="Print versions, GPUs, which backends run on CUDA and CPU tensors (and why "
        "not), and which optional comparison libraries are installed.",
    )
    info.add_argument("--json", metavar="PATH", help="also write it as JSON ('-': stdout only)")
    info.set_defaults(handler=_cmd_info)

    bench = commands.add_parser(
        "bench",
        help="time the ops against torch and other libraries",
        description="Time dinov2-fast's ops against torch and other libraries and print a table.\n"
        "Without a GPU only the torch paths are timed, on the CPU. Exits 1 if one of\n"
        "dinov2-fast's own kernels failed or gave wrong results.",
        epilog="benchmarks:\n"
        + "\n".join(
            f"  {name}: {get(name).summary}\n    --shapes {get(name).shapes_help}"
            for name in REGISTRY
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"which ({', '.join(REGISTRY)}); default: all. `bench {TUNE}` (alone) writes the "
        "table of backend='auto' instead",
    )
    bench.add_argument("--json", metavar="PATH", help="write the report as JSON ('-': stdout only)")
    bench.add_argument(
        "--shapes",
        help="replace the default shapes, in the benchmark's form (below); without NAME, run the "
        "benchmarks whose form it is",
    )
    bench.add_argument(
        "--dtype", choices=list(DTYPES), help="default: bf16 (bench tune: bf16, then fp16)"
    )
    bench.add_argument(
        "--device", choices=["cuda", "cpu"], help="default: cuda when a GPU is present, else cpu"
    )
    bench.add_argument(
        "--quick", action="store_true", help="small shapes, few repetitions (tests, CI)"
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="include torch.compile on the CPU too (always included on a GPU)",
    )
    bench.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        help="start no new measurement after S seconds; the rest is recorded as skipped (out of "
        "time) and the report is still written",
    )
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    _add_model_options(bench)
    _add_tune_options(bench)
    bench.set_defaults(handler=_cmd_bench)

    report = commands.add_parser(
        "report",
        help="print the tables of a saved `bench --json` report",
        description="Print the tables of a report that `dinov2-fast bench --json` wrote.",
    )
    report.add_argument("path", metavar="PATH")
    report.add_argument(
        "--headline", action="store_true", help="only the numbers the targets are set for"
    )
    report.set_defaults(handler=_cmd_report)

    from dinov2_fast.train.cli import add_commands

    add_commands(commands)
    return parser


def _add_model_options(bench: argparse.ArgumentParser) -> None:
    from dinov2_fast.benchmark import train_step
    from dinov2_fast.benchmark.model import ARCHS, CPU, CPU_DEPTH, DEFAULTS, QUICK, SOURCES

    presets = ", ".join(f"{arch} -> {preset}" for arch, preset in train_step.PRESETS.items())
    group = bench.add_argument_group(
        "model and train-step benchmarks (bench model, bench train-step)",
        f"model: without a GPU or with --quick a tiny model of {CPU_DEPTH} blocks runs, and "
        f"unless given a small batch and images (batch {CPU['batch']}, {CPU['img_size']} px; "
        f"--quick: {QUICK['arch']}, batch {QUICK['batch']}, {QUICK['img_size']} px). "
        f"train-step: --arch picks the trainer's preset ({presets}); without a GPU or with "
        f"--quick, unless --arch is given, the {train_step.TINY_PRESET} preset's tiny ViT at "
        f"batch {train_step.SMALL['batch']}.",
    )
    group.add_argument("--arch", choices=list(ARCHS), help=f"the ViT (default: {DEFAULTS['arch']})")
    group.add_argument(
        "--batch",
        type=int,
        metavar="B",
        help=f"images per step (default: {DEFAULTS['batch']}; train-step: at least 2)",
    )
    group.add_argument(
        "--img-size",
        type=int,
        metavar="PX",
        help=f"image side, a multiple of the patch size 14 (default: {DEFAULTS['img_size']}); "
        "train-step: the global crops' side (the local crops keep the preset's, 98 px)",
    )
    group.add_argument(
        "--drop-path",
        type=float,
        metavar="P",
        help=f"stochastic depth rate of every block (default: {DEFAULTS['drop_path']}, as "
        "DINOv2's ViT-L/14 config; train-step: the preset's)",
    )
    group.add_argument(
        "--plot",
        metavar="PATH",
        help="train-step: also draw images/s and peak memory per provider as a bar chart "
        f"(.{', .'.join(train_step.PLOT_FORMATS)}; needs matplotlib)",
    )
    group.add_argument(
        "--source",
        choices=list(SOURCES),
        help="dinov2: DINOv2's model with stock PyTorch blocks; timm: timm's "
        "vit_*_patch14_dinov2, when timm is installed (default: dinov2)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # train's key=value overrides may come after its options too
        if getattr(args, "command", None) == "train" and all(
            "=" in item and not item.startswith("-") for item in extra
        ):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args, parser)


if __name__ == "__main__":
    raise SystemExit(main())
