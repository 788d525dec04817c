"""``dinov2-fast train`` and ``dinov2-fast eval knn`` (added to the command by dinov2_fast.cli).

dinov2-fast train [--config demo|vits14|vitb14|vitl14|vitg14|FILE.yaml] [--data DIR]
                  [--output-dir DIR] [--impl fast|baseline] [--max-steps N] [--resume]
                  [--no-progress] [key=value ...]
dinov2-fast eval knn [--checkpoint PATH] [--data DIR] [--k K] [--temperature T]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_commands"]


def add_commands(commands) -> None:
    from dinov2_fast.train.config import PRESETS

    train = commands.add_parser(
        "train",
        help="self-supervised DINOv2 training (demo: a tiny ViT on bundled digits, on a CPU)",
        description="Train a ViT with DINOv2's method. The config is a preset (or a YAML file) "
        "plus key=value overrides with DINOv2's keys, e.g. optim.base_lr=1e-3 "
        "train.batch_size_per_gpu=32. Under torchrun the student and teacher are sharded with "
        "FSDP. Writes config.yaml, checkpoints/, training_metrics.jsonl and summary.json to the "
        "output directory.",
    )
    train.add_argument(
        "--config",
        default="demo",
        metavar="NAME|FILE",
        help=f"a preset ({', '.join(PRESETS)}) or a .yaml file (default: demo)",
    )
    train.add_argument("--data", metavar="DIR", help="a folder of images (overrides train.dataset)")
    train.add_argument(
        "--output-dir",
        metavar="DIR",
        help="where checkpoints and metrics go (default: ./dinov2-fast-runs/<config>-<impl>)",
    )
    train.add_argument(
        "--impl",
        choices=["fast", "baseline", "stock"],
        help="fast: our kernels, packed crops, subset drop path; baseline: stock PyTorch as the "
        "iBOT code ran it; stock: the baseline with SDPA attention (default: the config's "
        "compute.impl, fast)",
    )
    train.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in the output dir",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a trained teacher (k-NN)")
    which = evaluate.add_subparsers(dest="eval_command", metavar="EVAL")
    knn = which.add_parser(
        "knn",
        help="k-NN accuracy of the teacher's features on a labelled folder",
        description="Top-1 k-NN accuracy (DINO's weighted vote) of the teacher backbone's CLS "
        "features: DATA/train against DATA/val (or DATA/test), or one labelled folder split "
        "80/20; without --data, scikit-learn's bundled digits.",
    )
    knn.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a training output dir, its checkpoints/ dir, or one step_* checkpoint",
    )
    knn.add_argument("--data", metavar="DIR", help="labelled images: DIR/<class>/<image>")
    knn.add_argument("--k", type=int, default=20, help="neighbours (default: 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="default: 0.07")
    knn.add_argument("--batch-size", type=int, default=128, help="default: 128")
    knn.set_defaults(handler=_cmd_knn)
    evaluate.set_defaults(handler=lambda args, parser: _missing(evaluate))


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _error(command: str, message: object) -> int:
    print(f"dinov2-fast {command}: error: {message}", file=sys.stderr)
    return 2


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dinov2_fast.train.config import load_config
    from dinov2_fast.train.trainer import NonFiniteLossError, train

    overrides = list(args.overrides)
    if args.impl:
        overrides.append(f"compute.impl={args.impl}")
    if args.max_steps is not None and args.max_steps < 1:
        return _error("train", f"--max-steps must be at least 1, got {args.max_steps}")
    try:
        cfg = load_config(args.config, overrides)
        name = Path(str(args.config)).stem
        output_dir = args.output_dir or Path("dinov2-fast-runs") / f"{name}-{cfg.compute.impl}"
        summary = train(
            cfg,
            output_dir=output_dir,
            data=args.data,
            resume=args.resume,
            max_steps=args.max_steps,
            progress=not args.no_progress,
        )
    except NonFiniteLossError as error:
        print(f"dinov2-fast train: {error}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError) as error:
        return _error("train", error.args[0] if error.args else error)
    if summary.rank == 0:
        for line in summary.lines():
            print(line)
    return 0


def _config_near(path: Path) -> Path | None:
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _cmd_knn(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from dinov2_fast.fsdp import load_checkpoint
    from dinov2_fast.train.config import load_config
    from dinov2_fast.train.evaluate import evaluate_knn, knn_splits
    from dinov2_fast.train.meta_arch import SSLMetaArch

    path = Path(args.checkpoint)
    if not path.exists():
        return _error("eval knn", f"--checkpoint {path} does not exist")
    config_path = _config_near(path)
    if config_path is None:
        return _error("eval knn", f"no config.yaml next to {path} (a training output dir has one)")
    try:
        cfg = load_config(config_path)
        source = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        torch.manual_seed(0)
        model = SSLMetaArch(cfg)
        load_checkpoint(source, model=model)
        train_set, test_set = knn_splits(args.data)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        accuracy = evaluate_knn(
            model.teacher.backbone.to(device),
            train_set,
            test_set,
            image_size=cfg.crops.global_crops_size,
            device=device,
            k=args.k,
            temperature=args.temperature,
            batch_size=args.batch_size,
        )
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError) as error:
        return _error("eval knn", error.args[0] if error.args else error)
    data = args.data or "digits (bundled with scikit-learn)"
    print(f"k-NN top-1 accuracy (k={args.k}): {accuracy:.2f}% on {data}")
    return 0
