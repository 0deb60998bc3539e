"""`mtl`: the command-line front end. Each command parses its arguments and calls the library.

User errors (bad paths, data, configs) print one line and exit with status 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from metatransfer.config import Config, load_config
from metatransfer.errors import UserError

Handler = Callable[[argparse.Namespace], int]
QUIET_HELP = (
    "no progress bars, status lines or per-epoch notes (results and errors still print); see MTL_PROGRESS"
)


def _config(args: argparse.Namespace) -> Config:
    """The config file (or defaults), then --set overrides, then --data-root mapped to the dataset folder
    (and --tensorboard; refused at once, before any work, when tensorboard is not installed)."""
    cfg = load_config(getattr(args, "config", None), args.set or [])
    if getattr(args, "tensorboard", False):
        cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, tensorboard=True))
    if cfg.logging.tensorboard:
        from metatransfer.monitor import require_tensorboard

        require_tensorboard()
    return _with_data_root(cfg, getattr(args, "data_root", None))


def _with_data_root(cfg: Config, data_root: str | None) -> Config:
    if not data_root:
        return cfg
    from metatransfer.data.readers import with_data_root

    return with_data_root(cfg, data_root)


def _out(args: argparse.Namespace, cfg: Config, phase: str) -> Path:
    """The output folder, refused up front (before any work) if it is not ours or lies in the dataset."""
    from metatransfer.runs import check_output

    out = Path(args.out) if args.out else Path("runs") / cfg.name / phase
    return check_output(out, data_root=cfg.data.root)


def cmd_datasets(args: argparse.Namespace) -> int:
    from metatransfer.data.readers import READERS

    width = max(len(n) for n in READERS)
    for name, reader in sorted(READERS.items()):
        print(f"{name:<{width}}  {reader.layout}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from metatransfer.data.check import check_dataset

    report = check_dataset(
        args.dataset,
        args.root,
        scheme=args.scheme,
        rotations=args.rotations,
        size=args.size,
        cache_dir=args.cache_dir,
    )
    print(report.render())
    return 0 if report.usable else 2


def cmd_pretrain(args: argparse.Namespace) -> int:
    from metatransfer.train.pretrain import pretrain

    cfg = _config(args)
    path = pretrain(cfg, _out(args, cfg, "pretrain"), overwrite=args.overwrite, resume=args.resume)
    print(f"backbone: {path}")
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    from metatransfer.train.meta import meta_train

    cfg = _config(args)
    path = meta_train(
        cfg, Path(args.pretrained), _out(args, cfg, "meta"), overwrite=args.overwrite, resume=args.resume
    )
    print(f"model: {path}")
    return 0


def cmd_meta_test(args: argparse.Namespace) -> int:
    from metatransfer.train.meta_test import TestSetting, meta_test, run_config

    run_dir = Path(args.run_dir)
    cfg = _with_data_root(run_config(run_dir, args.set or []), args.data_root)
    shot = args.shot if args.shot is not None else cfg.meta.shot
    seed = args.seed if args.seed is not None else cfg.eval.seed
    setting = TestSetting(args.split, args.way, shot, args.query, args.episodes, seed)
    (result,) = meta_test(run_dir, [setting], cfg)
    print(result.line)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from metatransfer.train.compare import compare_runs
    from metatransfer.train.evaluate import format_delta
    from metatransfer.train.meta_test import TestSetting, run_config

    run_a, run_b = Path(args.run_a), Path(args.run_b)
    cfg_a, cfg_b = (_with_data_root(run_config(r), args.data_root) for r in (run_a, run_b))
    shot = args.shot if args.shot is not None else cfg_a.meta.shot
    seed = args.seed if args.seed is not None else cfg_a.eval.seed
    setting = TestSetting(args.split, args.way, shot, args.query, args.episodes, seed)
    a, b, delta, ci = compare_runs(run_a, cfg_a, run_b, cfg_b, setting)
    print(f"A {run_a}: {a.line}")
    print(f"B {run_b}: {b.line}")
    print(
        f"A - B: {format_delta(delta, ci)} points (paired 95% CI over the same {len(a.accuracies)} episodes)"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from metatransfer.train.pipeline import run_all

    cfg = _config(args)
    run_all(cfg, _out(args, cfg, "run"), overwrite=args.overwrite)
    return 0


def cmd_compare_ht(args: argparse.Namespace) -> int:
    from metatransfer.train.compare import compare_ht

    cfg = _config(args)
    compare_ht(cfg, Path(args.pretrained), _out(args, cfg, "compare-ht"), overwrite=args.overwrite)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from metatransfer.train.baselines import METHODS, ablate

    cfg = _config(args)
    if args.split:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, split=args.split))
    methods = args.methods.split(",") if args.methods else list(METHODS)
    shots = [int(s) for s in args.shots.split(",")]
    episodes = args.episodes or cfg.eval.episodes
    out = _out(args, cfg, "ablation")
    extra = {}
    for item in args.extra or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or "," in name:
            raise UserError(f"--extra '{item}' must look like NAME=CONFIG.yaml (a name without commas)")
        extra[name.strip()] = load_config(path)
    ablate(cfg, Path(args.pretrained), out, methods, shots, episodes, overwrite=args.overwrite, extra=extra)
    print(f"table: {out / 'ablation.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from metatransfer.report import cmd_report as report

    print(report(args.run_dir, args.json))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from metatransfer.card import describe, render

    desc = describe(args.model)
    print(json.dumps(desc, indent=2) if args.json else render(desc))
    return 0


def version_text() -> str:
    """`mtl --version`: the versions a bug report needs (package, Python, torch, the device torch sees)."""
    import platform

    import torch

    from metatransfer import __version__
    from metatransfer.device import cpu_has_bf16

    lines = [
        f"metatransfer {__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"device: cuda {torch.version.cuda} ({names})")
    else:
        cpu = _cpu_name()
        bf16 = "native bf16" if cpu_has_bf16() else "no native bf16"
        lines.append(f"device: cpu ({cpu}, {torch.get_num_threads()} threads, {bf16}); no CUDA device")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


class _Version(argparse.Action):
    """Prints `version_text` and exits; torch is imported only when asked (keeps `mtl --help` fast)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print versions and exit"
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_text())
        parser.exit()


def _common_train_args(p: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, help="YAML config file (see configs/)")
    p.add_argument("--data-root", help="folder holding the dataset (or its parent, e.g. ../shared/data)")
    p.add_argument("--out", help="run directory (default runs/<name>/<phase>)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. meta.way=20"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard scalars into each run directory (needs metatransfer[tensorboard])",
    )


def _test_setting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="test")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, help="default: the shot the model was meta-trained for")
    p.add_argument("--query", type=int, default=15)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--seed", type=int, help="episode seed (default: the run's eval.seed, the report seed)")
    p.add_argument("--data-root", help="where the dataset is now, if not where it was at training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtl", description="Meta-Transfer Learning for few-shot classification"
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    parser.add_argument("--version", action=_Version)
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("datasets", help="list dataset readers and the layout each expects")
    p.set_defaults(func=cmd_datasets)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="decode every image, report bad files, build the cache")
    p.add_argument("dataset")
    p.add_argument("--root", help="the dataset's folder (not needed for glyphs)")
    p.add_argument("--scheme", help="omniglot: vinyals (default) or lake")
    p.add_argument(
        "--rotations", action="store_true", help="omniglot vinyals: add 90-degree rotation classes"
    )
    p.add_argument("--size", type=int, help="image side in pixels for the cache (default: the reader's)")
    p.add_argument("--cache-dir", help="cache folder (default $MTL_CACHE_DIR or ~/.cache/metatransfer)")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("pretrain", help="phase 1: supervised pre-training of the backbone")
    _common_train_args(p)
    p.add_argument("--resume", action="store_true", default=None, help="continue the unfinished run in --out")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("meta-train", help="phase 2: meta-transfer learning of scale-and-shift parameters")
    _common_train_args(p)
    p.add_argument("--pretrained", required=True, help="phase-1 run directory (or its backbone.safetensors)")
    p.add_argument("--resume", action="store_true", default=None, help="continue the unfinished run in --out")
    p.set_defaults(func=cmd_meta_train)

    p = sub.add_parser("meta-test", help="phase 3: accuracy with 95%% CI over few-shot episodes")
    p.add_argument("run_dir")
    _test_setting_args(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the run's config")
    p.set_defaults(func=cmd_meta_test)

    p = sub.add_parser("compare", help="two meta-train runs on identical episodes: the paired difference")
    p.add_argument("run_a")
    p.add_argument("run_b")
    _test_setting_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "compare-ht", help="meta-train with and without hard tasks; plot val accuracy vs tasks"
    )
    _common_train_args(p)
    p.add_argument("--pretrained", required=True, help="phase-1 run directory (or its backbone.safetensors)")
    p.set_defaults(func=cmd_compare_ht)

    p = sub.add_parser("ablate", help="every adaptation method on one backbone and identical episodes")
    _common_train_args(p)
    p.add_argument("--pretrained", required=True, help="phase-1 run directory (or its backbone.safetensors)")
    p.add_argument("--methods", help="comma-separated subset (default: all)")
    p.add_argument("--split", help="evaluation split (default: eval.split of the config)")
    p.add_argument("--shots", default="1,5")
    p.add_argument("--episodes", type=int, help="evaluation episodes (default: eval.episodes)")
    p.add_argument(
        "--extra",
        action="append",
        metavar="NAME=CONFIG",
        help="an extra meta-learned row trained with CONFIG's meta section, e.g. "
        "'mtl (original code)=configs/mini-imagenet-32-original.yaml'",
    )
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("run", help="all three phases end to end, with a summary table")
    _common_train_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="summary of a run (Markdown or --json); redraws its curves.png")
    p.add_argument("run_dir", help="a run directory: one phase, or the folder mtl run wrote")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("info", help="what a model is: its card (data, backbone, config, results)")
    p.add_argument("model", help="exported .mtl file or meta-train run directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    from metatransfer.predict import add_commands

    add_commands(sub)
    for command in sub.choices.values():  # `mtl run --quiet ...` as well as `mtl --quiet run ...`
        if not any("--quiet" in a.option_strings for a in command._actions):
            command.add_argument(
                "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP
            )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    from metatransfer import progress
    from metatransfer.device import keep_freed_memory

    keep_freed_memory()
    try:
        with progress.forced("off" if args.quiet else None):
            code = handler(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"mtl: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("mtl: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
