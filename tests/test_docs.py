"""The docs site: generated reference pages match the code, every config key has a meaning, the site
builds with --strict, and every `mtl <command> --flag` written in the README or docs/ is a real flag."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from metatransfer import config as config_module
from metatransfer.cli import _subparsers, build_parser
from metatransfer.docgen import field_comments, stale_pages
from metatransfer.docgen import main as docgen_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_generated_reference_pages_are_current() -> None:
    stale = [str(p.relative_to(ROOT)) for p in stale_pages(DOCS)]
    assert not stale, f"{stale} differ from the code: run python -m metatransfer.docgen and commit them"


def test_the_staleness_check_fails_on_a_page_that_differs(tmp_path: Path) -> None:
    assert docgen_main([str(tmp_path)]) == 0
    assert docgen_main([str(tmp_path), "--check"]) == 0
    page = tmp_path / "reference" / "config.md"
    page.write_text(page.read_text().replace("`meta.way`", "`meta.ways`"))
    assert docgen_main([str(tmp_path), "--check"]) == 1


def test_every_config_key_has_a_meaning() -> None:
    missing = []

    def walk(cls: type, prefix: str) -> None:
        meanings = field_comments(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            tp = config_module.__dict__.get(f.type) if isinstance(f.type, str) else f.type
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif not meanings.get(f.name):
                missing.append(prefix + f.name)

    walk(config_module.Config, "")
    assert not missing, f"config keys without a comment saying what they mean (config.py): {missing}"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[dev]')"
)
def test_the_site_builds_strict(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()


# ---- every `mtl <command> ... --flag` in the README and docs/ exists in that command's --help ----

PARSER = build_parser()


def _flags(parser: object) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}  # type: ignore[attr-defined]


def _command(words: list[str]) -> tuple[str, object] | None:
    """The (sub)command the words start with, as ("data check", parser); None for a placeholder."""
    parser: object = PARSER
    names: list[str] = []
    for word in words:
        subs = _subparsers(parser)  # type: ignore[arg-type]
        if not subs or word.startswith("-"):
            break
        if word not in subs[0].choices:
            if names:
                break
            return None if not word.islower() else (word, None)
        names.append(word)
        parser = subs[0].choices[word]
    return " ".join(names), parser


STOP = {"#", "|", ">", "2>&1", ";", "&&", "then", "and"}
INVOCATION = re.compile(r"(?:^|[\s`(])(?:mtl|-m metatransfer)\s+(.*)")


def mentions(text: str) -> list[str]:
    """Each written invocation: code-block lines (continuations joined) and inline code spans."""
    spans = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        spans += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans += [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose)]
    found = []
    for span in spans:
        # "omniglot.mtl --x" is a file name, and "mtl (original code)=..." a quoted row name
        for piece in re.split(r"(?<![\w./,=-])(?=mtl\s+[^\s(])|(?=-m metatransfer\s)", span):
            m = INVOCATION.match(" " + piece)
            if m:
                found.append(m.group(1))
    return found


def check(invocation: str) -> list[str]:
    try:
        tokens = shlex.split(invocation, comments=False)
    except ValueError:
        tokens = invocation.split()
    words = []
    for tok in tokens:
        if tok in STOP or tok.startswith("#"):
            break
        words.append(tok.strip("[](),.;"))
    globals_ = [
        w for w in words[: next((i for i, w in enumerate(words) if not w.startswith("-")), len(words))]
    ]
    rest = words[len(globals_) :]
    problems = [f"mtl {g}" for g in globals_ if g.split("=")[0] not in _flags(PARSER)]
    found = _command(rest)
    if found is None or not rest:
        return problems
    name, parser = found
    if parser is None:
        return [*problems, f"no command mtl {name}"]
    for w in rest:
        flag = w.split("=")[0]
        if re.fullmatch(r"--?[a-z][a-z0-9-]*", flag) and flag not in _flags(parser):
            problems.append(f"mtl {name} {flag}")
    return problems


DOC_FILES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), ROOT / "benchmarks" / "README.md"]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_written_in_the_docs_exists(path: Path) -> None:
    problems = sorted({p for inv in mentions(path.read_text(encoding="utf-8")) for p in check(inv)})
    assert not problems, f"{path.relative_to(ROOT)} names flags or commands that --help does not: {problems}"


def test_the_flag_check_catches_a_wrong_flag() -> None:
    text = (
        "Run `mtl meta-test RUN --shots 1` or\n\n```\nmtl compare A B \\\n  --split val --epsiodes 9\n```\n"
    )
    assert sorted(p for inv in mentions(text) for p in check(inv)) == [
        "mtl compare --epsiodes",
        "mtl meta-test --shots",
    ]
    assert check("data check glyphs --root D --data-root D") == []
    assert check("--debug run --config c.yaml --quiet") == []
    assert check("frobnicate --x") == ["no command mtl frobnicate"]
