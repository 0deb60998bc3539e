"""`mtl --help` and each command's help say what the commands do: grouped commands, every flag's help
with its default, flags accepted anywhere, one name per flag, no flag accepted and then ignored."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from metatransfer.cli import COMMAND_GROUPS, _group_commands, _subparsers, build_parser, main
from metatransfer.errors import UserError

from tiny import write_pattern_folder


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (sub)command's parser by its words, e.g. ("data", "check")."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for action in _subparsers(parser):
        for name, command in action.choices.items():
            found[(*path, name)] = command
            found.update(commands(command, (*path, name)))
    return found


ALL = commands(build_parser())


def rendered(default: object) -> str:
    """How a help text writes a default: 5, 0.01, 1,5 (a list), cpu."""
    if isinstance(default, list):
        return ",".join(rendered(v) for v in default)
    return f"{default:g}" if isinstance(default, float) else str(default)


def test_top_level_help_groups_the_commands_and_shows_the_workflow(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    top = {words[0] for words in ALL}
    listed: list[str] = []
    position = 0
    for title, names in COMMAND_GROUPS.items():
        heading = text.index(f"{title} commands:", position)  # the groups appear in this order
        position = heading
        block = text[heading:].split("\n\n", 1)[0].splitlines()[1:]
        firsts = [line.split()[0] for line in block if line.startswith("  ") and not line.startswith("     ")]
        assert firsts == [n for n in names if n in top], title
        listed += firsts
    assert sorted(listed) == sorted(top), "every command is listed exactly once"
    assert "the usual workflow:" in text and "mtl run --config" in text


def test_a_command_missing_from_the_groups_is_still_listed() -> None:
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="the run command")
    sub.add_parser("brand-new", help="a command nobody grouped")
    _group_commands(parser, sub)
    text = parser.format_help()
    assert "workflow commands:\n  run" in text
    assert "other commands:\n  brand-new" in text


@pytest.mark.parametrize("words", sorted(ALL), ids=" ".join)
def test_every_flag_has_help_that_shows_its_default(words: tuple[str, ...]) -> None:
    for action in ALL[words]._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        assert action.help and action.help != argparse.SUPPRESS, f"mtl {' '.join(words)} {flag}: no help"
        takes_value = action.nargs != 0
        if takes_value and not action.required:
            assert "default" in action.help, f"mtl {' '.join(words)} {flag}: help names no default"
            if action.default not in (None, argparse.SUPPRESS):
                shown = rendered(action.default)
                assert shown in action.help, f"mtl {' '.join(words)} {flag}: default {shown} not in its help"


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", "--quiet", "report", "R"],
        ["report", "R", "--debug", "--quiet"],
        ["report", "--debug", "R", "-q"],
        ["data", "check", "glyphs", "--debug", "--quiet"],
        ["data", "--debug", "check", "glyphs", "-q"],
    ],
    ids=" ".join,
)
def test_debug_and_quiet_are_accepted_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.debug is True and args.quiet is True


def test_debug_after_the_command_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("mtl: error:")
    with pytest.raises(UserError):
        main(["report", str(tmp_path / "none"), "--debug"])


def test_data_check_takes_data_root_and_keeps_root_as_an_alias() -> None:
    parser = build_parser()
    for flag in ("--data-root", "--root"):
        assert parser.parse_args(["data", "check", "image-folder", flag, "D"]).data_root == "D"


@pytest.mark.parametrize(
    "argv", [["data", "check", "image-folder"], ["data", "check", "image-folder", "--root", "/no/such/dir"]]
)
def test_a_missing_dataset_folder_names_the_flag(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "--root " not in err, err


@pytest.mark.parametrize("flag", ["--overwrite", "--tensorboard"])
def test_tune_base_learner_refuses_flags_it_would_ignore(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tune-base-learner", "--config", "c.yaml", "--pretrained", "p", flag]
    assert main(argv) == 2
    assert flag in capsys.readouterr().err


def test_the_flags_every_training_command_acts_on_are_there() -> None:
    for words in [("pretrain",), ("meta-train",), ("run",), ("ablate",), ("compare-ht",)]:
        flags = {s for a in ALL[words]._actions for s in a.option_strings}
        assert {"--overwrite", "--tensorboard", "--data-root", "--set"} <= flags, words


@pytest.fixture(scope="module")
def val_only_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A meta-train run whose config evaluates on val, over a dataset that has no test split at all
    (as miniImageNet-32 here): a meta-test that fell back to "test" could only fail."""
    from test_predict import make_run

    tmp = tmp_path_factory.mktemp("valrun")
    data = write_pattern_folder(tmp / "data", per_class=6)
    for image in (data / "test").rglob("*.png"):
        image.unlink()
    for folder in sorted((data / "test").rglob("*"), reverse=True):
        folder.rmdir()
    (data / "test").rmdir()
    run = make_run(tmp / "run", channels=3)  # image-folder reads RGB
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = {"dataset": "image-folder", "root": str(data), "size": 28, "cache_dir": str(tmp / "cache")}
    cfg["eval"]["split"] = "val"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


@pytest.mark.parametrize("command", ["meta-test", "compare"])
def test_meta_test_and_compare_use_the_runs_eval_split(
    command: str, val_only_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [str(val_only_run)] * (2 if command == "compare" else 1)
    assert main([command, *runs, "--way", "3", "--shot", "1", "--query", "2", "--episodes", "4", "-q"]) == 0
    out = capsys.readouterr().out
    assert "val split" in out and "test split" not in out, out
    # An explicit --split still wins: this dataset has no test split, so asking for it is one line.
    assert main([command, *runs, "--split", "test", "--way", "3", "--episodes", "4", "-q"]) == 2
    assert capsys.readouterr().err.startswith("mtl: error:")
