"""`mtl`: the command-line front end. Each command parses its arguments and calls the library.

User errors (bad paths, data, configs, arguments, a file we cannot read or write) print one line and
exit with status 2; `--debug` shows the traceback instead. `main` returns the exit status; the `mtl`
console script and `python -m metatransfer` exit with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from metatransfer.config import (
    Count,
    ImageSize,
    InnerSteps,
    LearningRate,
    OmniglotScheme,
    Precision,
    Seed,
    Shot,
    Split,
    Temperature,
    Way,
    check_value,
    choices,
    load_config,
    short,
)
from metatransfer.errors import UserError

if TYPE_CHECKING:
    from metatransfer.config import Config
    from metatransfer.train.meta_test import TestSetting

Handler = Callable[[argparse.Namespace], int]
QUIET_HELP = (
    "no progress bars, status lines or per-epoch notes (results and errors still print); see MTL_PROGRESS"
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`mtl: error: ...`, exit 2) like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _number(tp: Any, name: str, kind: type = int) -> Callable[[str], Any]:
    """An argparse `type` that parses an int (or `kind`) and checks it against `tp`'s declared range (as the
    config does)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise UserError(f"argument {name} expects {what}, got {short(text)}") from None
        return check_value(value, tp, name)

    return parse


def _numbers(tp: Any, name: str, kind: type = int) -> Callable[[str], list[Any]]:
    """A comma-separated list of numbers (`--shots 1,5`), each checked like `_number`."""
    one = _number(tp, name, kind)
    return lambda text: [one(part.strip()) for part in text.split(",")]


def _config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Any:
    """The config file (or defaults), then --set overrides (and `extra` ones), then --data-root mapped to
    the dataset folder (and --tensorboard; refused at once, before any work, when tensorboard is not
    installed)."""
    cfg = load_config(getattr(args, "config", None), [*(args.set or []), *extra])
    if getattr(args, "tensorboard", False):
        cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, tensorboard=True))
    if cfg.logging.tensorboard:
        from metatransfer.monitor import require_tensorboard

        require_tensorboard()
    return _with_data_root(cfg, getattr(args, "data_root", None))


def _with_data_root(cfg: Any, data_root: str | None) -> Any:
    if not data_root:
        return cfg
    from metatransfer.data.readers import with_data_root

    return with_data_root(cfg, data_root)


def _out(args: argparse.Namespace, cfg: Any, phase: str) -> Path:
    """The output folder, refused up front (before any work) if it is not ours or lies in the dataset."""
    from metatransfer.runs import check_output

    out = Path(args.out) if args.out else Path("runs") / cfg.name / phase
    return check_output(out, data_root=cfg.data.root)


def _preflight(cfg: Any, phases: Sequence[str]) -> None:
    """Check the config against the dataset (class counts, class sizes, image size) before any training."""
    from metatransfer.data.check import check_config_against_data

    check_config_against_data(cfg, phases)


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
        args.data_root,
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
    out = _out(args, cfg, "pretrain")
    _preflight(cfg, ["pretrain"])
    path = pretrain(cfg, out, overwrite=args.overwrite, resume=args.resume)
    print(f"backbone: {path}")
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    from metatransfer.train.meta import meta_train

    cfg = _config(args)
    out = _out(args, cfg, "meta")
    _preflight(cfg, ["meta"])
    path = meta_train(cfg, Path(args.pretrained), out, overwrite=args.overwrite, resume=args.resume)
    print(f"model: {path}")
    return 0


def cmd_meta_test(args: argparse.Namespace) -> int:
    from metatransfer.train.meta_test import meta_test, run_config

    meta_keys = [s.split("=", 1)[0].strip() for s in args.set or [] if s.strip().startswith("meta.")]
    if meta_keys:
        raise UserError(
            f"meta-test uses the meta settings saved with the model, so --set {meta_keys[0]} would be ignored; "
            "use --way/--shot/--query, or meta-train again"
        )
    run_dir = Path(args.run_dir)
    cfg = _with_data_root(run_config(run_dir, args.set or []), args.data_root)
    out = Path(args.out) if args.out else None
    (result,) = meta_test(run_dir, [_test_setting(args, cfg)], cfg, out=out)
    print(result.line)
    return 0


def _test_setting(args: argparse.Namespace, cfg: Config) -> TestSetting:
    """The episodes `--split/--way/--shot/--query/--episodes/--seed` ask for; split, shot and seed default
    to the run's (eval.split, its meta-trained shot, and eval.seed: the report seed, not the one that chose
    the model)."""
    from metatransfer.train.meta_test import TestSetting

    # The run's eval.split, not a fixed "test": a config that evaluates on val (miniImageNet-32, whose
    # test split is withheld) must work with the bare command.
    split = args.split if args.split is not None else cfg.eval.split
    shot = args.shot if args.shot is not None else cfg.meta.shot
    seed = args.seed if args.seed is not None else cfg.eval.seed
    return TestSetting(split, args.way, shot, args.query, args.episodes, seed)


def cmd_compare(args: argparse.Namespace) -> int:
    from metatransfer.runs import atomic_write_bytes, lock_if_ours
    from metatransfer.train.compare import compare_runs, plot_curves, read_curve
    from metatransfer.train.evaluate import format_delta
    from metatransfer.train.meta_test import run_config

    if len(args.runs) < 2:
        raise UserError("mtl compare needs at least two runs: each is compared with the last")
    if len(args.runs) > 26:
        raise UserError(f"mtl compare takes at most 26 runs (A to Z), not {len(args.runs)}")
    paths = [Path(r) for r in args.runs]
    runs = [(r, _with_data_root(run_config(r), args.data_root)) for r in paths]
    results, deltas = compare_runs(runs, _test_setting(args, runs[0][1]))
    letters = [chr(ord("A") + i) for i in range(len(runs))]
    for letter, path, result in zip(letters, paths, results, strict=True):
        print(f"{letter} {path}: {result.line}")
    episodes = len(results[-1].accuracies)
    for letter, (delta, ci) in zip(letters, deltas, strict=False):
        print(
            f"{letter} - {letters[-1]}: {format_delta(delta, ci)} points "
            f"(paired 95% CI over the same {episodes} episodes)"
        )
    if args.curves:
        m, seed = runs[0][1].meta, runs[0][1].eval.selection_seed
        names = [f"{letter} {path.name}" for letter, path in zip(letters, paths, strict=True)]
        names[-1] += " (reference)"
        curves = {name: read_curve(path) for name, path in zip(names, paths, strict=True)}
        title = f"{m.way}-way {m.shot}-shot val during meta-training (selection episodes, seed {seed})"
        with lock_if_ours(Path(args.curves).parent, "compare"):
            atomic_write_bytes(Path(args.curves), plot_curves(curves, title))
        print(f"curves: {args.curves}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from metatransfer.train.pipeline import run_all

    cfg = _config(args)
    out = _out(args, cfg, "run")
    _preflight(cfg, ["pretrain", "meta", "eval"])
    run_all(cfg, out, overwrite=args.overwrite)
    return 0


def cmd_compare_ht(args: argparse.Namespace) -> int:
    from metatransfer.train.compare import compare_ht

    cfg = _config(args)
    out = _out(args, cfg, "compare-ht")
    _preflight(cfg, ["meta"])
    compare_ht(cfg, Path(args.pretrained), out, overwrite=args.overwrite)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from metatransfer.train.baselines import METHODS, ablate

    cfg = _config(args, [f"eval.split={args.split}"] if args.split else [])
    methods = args.methods.split(",") if args.methods else list(METHODS)
    episodes = args.episodes if args.episodes is not None else cfg.eval.episodes
    out = _out(args, cfg, "ablation")
    _preflight(cfg, ["meta", "eval"])
    extra = {}
    for item in args.extra or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or "," in name:
            raise UserError(f"--extra '{item}' must look like NAME=CONFIG.yaml (a name without commas)")
        extra[name.strip()] = load_config(path)
    rows = ablate(
        cfg,
        Path(args.pretrained),
        out,
        methods,
        args.shots,
        episodes,
        overwrite=args.overwrite,
        keep_going=args.keep_going,
        extra=extra,
    )
    print(f"table: {out / 'ablation.md'}")
    failed = [r for r in rows if r.error]
    if failed:
        print(f"mtl: {len(failed)} of {len(rows)} ablation rows failed (see the table)", file=sys.stderr)
    return 0


def cmd_tune_base_learner(args: argparse.Namespace) -> int:
    from metatransfer.train.baselines import tune_and_report

    cfg = _config(args)
    out = _out(args, cfg, "tune-base-learner")
    _preflight(cfg, ["eval"])
    out.mkdir(parents=True, exist_ok=True)
    grid = [(st, lr, t) for st in args.steps for lr in args.lrs for t in args.temperatures]
    print(tune_and_report(cfg, Path(args.pretrained), out, args.shots, grid, args.episodes))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """`mtl predict`: exit 0, or 1 when some query images could not be read (they are listed)."""
    from metatransfer.predict import format_table, load, predict_folder, query_files

    queries = query_files(args.query)
    learner = load(args.model, device=args.device, precision=args.precision)
    results = predict_folder(learner, args.support, queries, args.top_k)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(format_table(results))
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"mtl: {failed} of {len(results)} query images could not be read", file=sys.stderr)
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from metatransfer.predict import export_model

    path = export_model(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"exported: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from metatransfer.report import cmd_report as report

    print(report(args.run_dir, args.json))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from metatransfer import pretrained
    from metatransfer.card import describe, render

    path, name = pretrained.resolve(args.model)  # a shipped name -> its verified file
    desc = describe(path)
    shipped = pretrained.registry()[name] if name else None
    if args.json:
        print(json.dumps({**desc, "shipped": shipped.to_json() if shipped else None}, indent=2))
    else:
        print(render(desc) + (f"\n{pretrained.describe(shipped)}" if shipped else ""))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from metatransfer import pretrained

    models = pretrained.registry()
    if args.json:
        print(json.dumps([m.to_json() for m in models.values()], indent=2))
    elif models:
        print(pretrained.format_table(models))
    else:
        print("no models are shipped with this installation")
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


def _common_train_args(
    p: argparse.ArgumentParser,
    *,
    config_required: bool = True,
    overwrite: bool = True,
    tensorboard: bool = True,
) -> None:
    """The flags training commands share; `overwrite`/`tensorboard` False for a command that would ignore
    them (a flag that is accepted and then ignored misleads more than an error does)."""
    p.add_argument("--config", required=config_required, help="YAML config file (see configs/)")
    p.add_argument(
        "--data-root",
        help="folder holding the dataset, or its parent, e.g. ../shared/data (default: the config's data.root)",
    )
    p.add_argument("--out", help="run directory (default runs/<name>/<phase>)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. meta.way=20; repeatable (default: none)",
    )
    if overwrite:
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace a finished run in --out (only files metatransfer wrote)",
        )
    if tensorboard:
        p.add_argument(
            "--tensorboard",
            action="store_true",
            help="also write TensorBoard scalars into each run directory (needs metatransfer[tensorboard])",
        )


def _add_data_commands(sub: Any) -> None:
    p = sub.add_parser("datasets", help="list dataset readers and the layout each expects")
    p.set_defaults(func=cmd_datasets)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="decode every image, report bad files, build the cache")
    p.add_argument("dataset", help="a reader name (see mtl datasets)")
    # --root was this flag's name before every command used --data-root; old scripts keep working.
    p.add_argument(
        "--data-root",
        "--root",
        dest="data_root",
        help="the dataset's folder (default: none, which only glyphs accepts)",
    )
    p.add_argument(
        "--scheme", choices=choices(OmniglotScheme), help="omniglot: vinyals or lake (default vinyals)"
    )
    p.add_argument(
        "--rotations", action="store_true", help="omniglot vinyals: add 90-degree rotation classes"
    )
    p.add_argument(
        "--size",
        type=_number(ImageSize, "--size"),
        help="image side in pixels for the cache (default: the reader's own size)",
    )
    p.add_argument("--cache-dir", help="cache folder (default $MTL_CACHE_DIR or ~/.cache/metatransfer)")
    p.set_defaults(func=cmd_data_check)


def _add_training_commands(sub: Any) -> None:
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
    p.add_argument("run_dir", help="a meta-train run directory")
    _test_setting_args(p)
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the run's config; repeatable (default: none)",
    )
    p.add_argument(
        "--out",
        help="folder for results.json and the episodes CSV (default: the run directory, if its run has "
        "finished; an unfinished run is only evaluated, its results saved nowhere else)",
    )
    p.set_defaults(func=cmd_meta_test)

    p = sub.add_parser(
        "compare", help="meta-train runs on identical episodes: each one's paired difference from the last"
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories; the last is the reference")
    _test_setting_args(p)
    p.add_argument(
        "--curves",
        metavar="PNG",
        help="also draw the runs' val curves during meta-training, overlaid (default: no figure)",
    )
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
    p.add_argument("--methods", help="comma-separated subset of the methods (default: all of them)")
    p.add_argument(
        "--split", choices=choices(Split), help="evaluation split (default: eval.split of the config)"
    )
    p.add_argument(
        "--shots", type=_numbers(Shot, "--shots"), default=[1, 5], help="comma-separated (default 1,5)"
    )
    p.add_argument(
        "--episodes", type=_number(Count, "--episodes"), help="evaluation episodes (default: eval.episodes)"
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="go on after a row fails (it is marked in the table) and exit 0; default: stop with status 2",
    )
    p.add_argument(
        "--extra",
        action="append",
        metavar="NAME=CONFIG",
        help="an extra meta-learned row trained with CONFIG's meta section, e.g. "
        "'mtl (original code)=configs/mini-imagenet-32-original.yaml'; repeatable (default: none)",
    )
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser(
        "tune-base-learner",
        help="choose the base learner's steps, lr and temperature on val selection episodes; report vs NCM",
    )
    # It trains nothing and logs no curves: it writes only its own tables into --out.
    _common_train_args(p, overwrite=False, tensorboard=False)
    p.add_argument("--pretrained", required=True, help="phase-1 run directory (or its backbone.safetensors)")
    p.add_argument(
        "--shots", type=_numbers(Shot, "--shots"), default=[1, 5], help="comma-separated (default 1,5)"
    )
    p.add_argument(
        "--steps",
        type=_numbers(InnerSteps, "--steps"),
        default=[0, 10, 25, 50, 100],
        help="inner steps to try, comma-separated (default 0,10,25,50,100)",
    )
    p.add_argument(
        "--lrs",
        type=_numbers(LearningRate, "--lrs", float),
        default=[0.01, 0.03, 0.1, 0.3, 0.5],
        help="inner learning rates to try (default 0.01,0.03,0.1,0.3,0.5)",
    )
    p.add_argument(
        "--temperatures",
        type=_numbers(Temperature, "--temperatures", float),
        default=[5.0, 10.0, 20.0],
        help="logit temperatures to try (default 5,10,20)",
    )
    p.add_argument(
        "--episodes",
        type=_number(Count, "--episodes"),
        default=300,
        help="selection episodes per shot (seed eval.selection_seed; default 300)",
    )
    p.set_defaults(func=cmd_tune_base_learner)

    p = sub.add_parser("run", help="all three phases end to end, with a summary table")
    _common_train_args(p)
    p.set_defaults(func=cmd_run)


def _test_setting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=choices(Split), help="split to test on (default: the run's eval.split)")
    p.add_argument("--way", type=_number(Way, "--way"), default=5, help="classes per episode (default 5)")
    p.add_argument(
        "--shot",
        type=_number(Shot, "--shot"),
        help="support images per class (default: the shot the model was meta-trained for)",
    )
    p.add_argument(
        "--query", type=_number(Shot, "--query"), default=15, help="query images per class (default 15)"
    )
    p.add_argument(
        "--episodes", type=_number(Count, "--episodes"), default=600, help="episodes to average (default 600)"
    )
    p.add_argument(
        "--seed",
        type=_number(Seed, "--seed"),
        help="episode seed (default: the run's eval.seed, the report seed)",
    )
    p.add_argument(
        "--data-root",
        help="where the dataset is now, if not where it was at training (default: the run's data.root)",
    )


MODEL_HELP = "a shipped model's name (see mtl models), an exported .mtl file or a meta-train run directory"


def _add_model_commands(sub: Any) -> None:
    p = sub.add_parser("predict", help="classify your images after learning new classes from a few examples")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--support", required=True, help="folder with one sub-folder of images per class")
    p.add_argument(
        "--query", required=True, nargs="+", metavar="PATH", help="image files or folders (recursive)"
    )
    p.add_argument(
        "--top-k", type=_number(Count, "--top-k"), default=3, help="classes listed per image (default 3)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument(
        "--precision",
        choices=choices(Precision),
        help="default: the model's own, as mtl meta-test uses (auto: bf16 on CPUs with native bf16)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a meta-trained model as one portable .mtl file")
    p.add_argument("run_dir", help="meta-train run directory (or its model.safetensors)")
    p.add_argument("--out", required=True, help="output file, e.g. model.mtl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="summary of a run (Markdown or --json); redraws its curves.png")
    p.add_argument("run_dir", help="a run directory: one phase, or the folder mtl run wrote")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("info", help="what a model is: its card (data, backbone, config, results)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "models", help="the trained models shipped with metatransfer: dataset, image size, accuracy"
    )
    p.add_argument("--json", action="store_true", help="print JSON (every registry field)")
    p.set_defaults(func=cmd_models)


DEBUG_HELP = "show Python tracebacks for errors"

# How `mtl --help` lists the commands. A command missing here still works and is listed under "other
# commands", so a new command is never hidden by forgetting this table.
COMMAND_GROUPS = {
    "workflow": [
        "run",
        "pretrain",
        "meta-train",
        "meta-test",
        "predict",
        "export",
        "models",
        "info",
        "report",
    ],
    "analysis": ["ablate", "compare", "compare-ht", "tune-base-learner"],
    "data": ["datasets", "data"],
}

EPILOG = """\
the usual workflow:
  mtl predict mini-imagenet-32-5shot --support DIR --query DIR   a shipped model on your images (mtl models)
  mtl run --config configs/omniglot.yaml --data-root DATA        train: all three phases, summary table
  mtl meta-test runs/omniglot/run/meta-1shot --episodes 2000     more episodes on a trained run
  mtl export runs/omniglot/run/meta-1shot --out omniglot.mtl     one portable file of your model
  mtl predict omniglot.mtl --support DIR --query DIR             your model on your images

--debug and --quiet may come before or after the command. mtl COMMAND --help shows its flags."""


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _accept_anywhere(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command --debug and --quiet, so `mtl run --quiet` works as `mtl --quiet run` does.
    SUPPRESS keeps a subcommand from resetting a value the top level already parsed."""
    for action in _subparsers(parser):
        for command in action.choices.values():
            flags = {s for a in command._actions for s in a.option_strings}
            if "--debug" not in flags:
                command.add_argument(
                    "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
                )
            if "--quiet" not in flags:
                command.add_argument(
                    "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP
                )
            _accept_anywhere(command)


def _group_commands(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> None:
    """List the commands in `mtl --help` under COMMAND_GROUPS' headings instead of one flat list.

    argparse shows a subparsers action as one block; its per-command entries (`_choices_actions`) are
    moved into argument groups of their own, and the block itself is hidden (usage names COMMAND)."""
    entries = {a.dest: a for a in sub._choices_actions}
    grouped = {name for names in COMMAND_GROUPS.values() for name in names}
    groups = dict(COMMAND_GROUPS)
    others = [name for name in entries if name not in grouped]
    if others:
        groups["other"] = others
    for title, names in groups.items():
        present = [entries[n] for n in names if n in entries]
        if present:
            group = parser.add_argument_group(f"{title} commands")
            group._group_actions.extend(present)
    sub.help = argparse.SUPPRESS


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mtl",
        description="Meta-Transfer Learning for few-shot classification",
        usage="mtl [-h] [--version] [--debug] [-q] COMMAND ...",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--version", action=_Version)
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    # prog: argparse would otherwise build each command's usage from the custom usage line above.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog="mtl")
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_model_commands(sub)
    _accept_anywhere(parser)
    _group_commands(parser, sub)
    return parser


def _refuse_contradictions(args: argparse.Namespace) -> None:
    """One line (exit 2) for flags that ask for opposite things; otherwise one would silently win (with
    `--resume --overwrite`, overwrite would delete the progress the user meant to keep)."""
    if getattr(args, "resume", None) and getattr(args, "overwrite", False):
        raise UserError(
            "--resume and --overwrite contradict each other (resume keeps the run, overwrite deletes it); "
            "pass one of them"
        )
    sets = [item.split("=", 1) for item in getattr(args, "set", None) or [] if "=" in item]
    keys = {key.strip(): value.strip().lower() for key, value in sets}
    if getattr(args, "data_root", None) and "data.root" in keys:
        raise UserError("--data-root and --set data.root=... both name the dataset folder; pass one of them")
    if getattr(args, "tensorboard", False) and keys.get("logging.tensorboard") in ("false", "no", "0"):
        raise UserError("--tensorboard contradicts --set logging.tensorboard=false; pass one of them")


def _fail(message: str) -> int:
    print(f"mtl: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run `mtl` with `argv` (default: the command line) and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UserError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help and --version exit 0 from inside argparse
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    debug = args.debug
    handler: Handler = args.func
    from metatransfer import progress
    from metatransfer.device import keep_freed_memory

    keep_freed_memory()
    try:
        _refuse_contradictions(args)
        with progress.forced("off" if args.quiet else None):
            return handler(args)
    except UserError as exc:
        if debug:
            raise
        return _fail(str(exc))
    except OSError as exc:  # a read or write of ours that no message was prepared for: still one line
        if debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(f"cannot access{where}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        print("mtl: interrupted", file=sys.stderr)
        return 130
