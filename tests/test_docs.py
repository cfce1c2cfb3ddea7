"""The documentation never sends a reader to a command that does not parse or a file the
repository does not ship.

- Every `refilled ...` command shown in README.md, config/README.md, CHANGELOG.md and
  docs/**/*.md parses with refilled's own argparse parser. A fragment may leave out required
  options (`refilled pin`, `refilled train ... --joint-head 1`), never use an option the
  command does not have or a value its choices refuse; `a\\|b` in a table cell is checked
  as each alternative.
- Every `snakemake ...` command parses with Snakemake's own parser, its `--config` words are
  `key=value` pairs (a target written after `--config` fails here as it does in Snakemake),
  the config profile it names exists (measurement pages under docs/results/ may name a
  temporary profile they describe), and the targets of all of them build a DAG in one dry run.
- Every relative link resolves to a file of the repository, and its #anchor to a heading.
- Every `docs/...` path named in the code, the tests, the config profiles and the workflow
  exists.
- The commands the missing-data messages suggest parse, and no `--help` text prints a
  doubled percent sign.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "config" / "README.md", ROOT / "CHANGELOG.md",
                *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PROGRAMS = {"refilled": "refilled", ".venv/bin/refilled": "refilled",
            "snakemake": "snakemake", ".venv/bin/snakemake": "snakemake"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def commands_in(text: str) -> list[str]:
    """Command lines of refilled or snakemake: each line of a fenced block (continuations
    joined, `&&` split) and each inline code span that starts with one of them."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            found += [part.strip() for part in line.split("&&")]
    without_fences = FENCE.sub("", text)
    found += [" ".join(span.split()) for span in INLINE.findall(without_fences)]
    return [c for c in found if c.split(" ", 1)[0] in PROGRAMS]


def documented_commands() -> list[tuple[str, str]]:
    """(page, command), deduplicated per page, in page order."""
    seen = set()
    out = []
    for page in PAGES:
        for command in commands_in(page.read_text(encoding="utf-8")):
            if (page, command) not in seen:
                seen.add((page, command))
                out.append((rel(page), command))
    return out


COMMANDS = documented_commands()
REFILLED = [(p, c) for p, c in COMMANDS if PROGRAMS[c.split(" ", 1)[0]] == "refilled"]
SNAKEMAKE = [(p, c) for p, c in COMMANDS if PROGRAMS[c.split(" ", 1)[0]] == "snakemake"]


def words(command: str) -> list[str]:
    return shlex.split(command.replace("\\|", "|"), comments=True)[1:]


def alternatives(argv: list[str]) -> list[list[str]]:
    """`--set weighting=confidence|true-class` is two commands (a table cell's synopsis)."""
    return [list(choice) for choice in itertools.product(*(w.split("|") if "|" in w else [w] for w in argv))]


# ------------------------------------------------------------------------------------------------
# refilled
# ------------------------------------------------------------------------------------------------


@cache
def refilled_parser() -> argparse.ArgumentParser:
    from refilled.cli import build_parser
    return build_parser()


@cache
def bench_parser() -> argparse.ArgumentParser:
    from refilled.tools.bench import add_bench_arguments
    parser = argparse.ArgumentParser(prog="refilled bench")
    add_bench_arguments(parser)
    return parser


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def leaf(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)parser the command's leading words select, and the words left for it."""
    parser = refilled_parser()
    rest = list(argv)
    while rest and rest[0] in subparsers_of(parser):
        if rest[0] == "bench" and parser is refilled_parser():
            return bench_parser(), rest[1:]
        parser = subparsers_of(parser)[rest[0]]
        rest = rest[1:]
    return parser, rest


def parse_error(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """argparse's error message, or None when the words parse (--help counts as parsing)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as stop:
            return None if stop.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def refilled_problem(argv: list[str]) -> str | None:
    parser, rest = leaf(argv)
    if rest and not rest[0].startswith("-") and subparsers_of(parser):
        return f"unknown command {rest[0]!r}"
    full = parser if parser is bench_parser() else refilled_parser()
    error = parse_error(full, rest if full is bench_parser() else argv)
    if error is None:
        return None
    if "the following arguments are required" not in error:
        return error
    # a fragment: what it shows must exist
    unknown = [w.split("=", 1)[0] for w in rest if w.startswith("--") and w.split("=", 1)[0] not in
               option_names(parser)]
    return f"unknown options {unknown}" if unknown else None


@pytest.mark.parametrize("page, command", REFILLED, ids=[f"{p}: {c[:60]}" for p, c in REFILLED])
def test_refilled_command_parses(page, command):
    argv = words(command)
    problems = [(alt, p) for alt in alternatives([w for w in argv if w != "..."]) if (p := refilled_problem(alt))]
    assert not problems, f"{page}: `{command}`: {problems[0][1]}"


def test_commands_the_data_messages_suggest_parse():
    """`refilled data check` and `refilled doctor` tell a user without data what to run."""
    from refilled.data.datasets import HOW_TO_OBTAIN
    suggested = [c for how in HOW_TO_OBTAIN.values()
                 for c in commands_in(how.format(root="data/raw", dir="data/raw/DATASET"))]
    assert suggested, "no message suggests a refilled command"
    problems = [(c, p) for c in suggested if (p := refilled_problem(words(c)))]
    assert not problems, problems


def test_refilled_help_texts_have_no_doubled_percent():
    def walk(parser, name):
        yield name, parser
        for sub, p in subparsers_of(parser).items():
            yield from walk(p, f"{name} {sub}")
    doubled = [name for name, p in walk(refilled_parser(), "refilled") if "%%" in p.format_help()]
    assert not doubled, f"--help prints '%%' in: {doubled}"


# ------------------------------------------------------------------------------------------------
# snakemake
# ------------------------------------------------------------------------------------------------


@cache
def snakemake_parser() -> argparse.ArgumentParser:
    from snakemake.cli import get_argument_parser
    return get_argument_parser()


def snakemake_args(command: str) -> argparse.Namespace:
    from snakemake.cli import parse_config
    argv = words(command)
    error = parse_error(snakemake_parser(), argv)
    if error:
        raise AssertionError(error)
    args = snakemake_parser().parse_args(argv)
    try:
        args.parsed_config = parse_config(args.config)
    except ValueError as e:   # what Snakemake itself says of a target after --config
        raise AssertionError(str(e)) from None
    return args


@pytest.mark.parametrize("page, command", SNAKEMAKE, ids=[f"{p}: {c[:60]}" for p, c in SNAKEMAKE])
def test_snakemake_command_parses(page, command):
    try:
        args = snakemake_args(command)
    except AssertionError as e:
        pytest.fail(f"{page}: `{command}`: {e}")
    profile = args.parsed_config.get("profile")
    if profile is not None and not page.startswith("docs/results/"):
        assert (ROOT / "config" / f"{profile}.yaml").is_file(), f"{page}: `{command}`: no config/{profile}.yaml"
    if args.workflow_profile:
        assert (ROOT / args.workflow_profile).is_dir(), f"{page}: `{command}`: no {args.workflow_profile}"


def test_documented_targets_build_a_dag():
    """One dry run (smoke config profile, cheap) with every target the documentation names."""
    targets = set()
    for page, command in SNAKEMAKE:
        try:
            targets.update(snakemake_args(command).targets or ())
        except AssertionError:
            pass   # reported by test_snakemake_command_parses
    assert targets, "no Snakemake target in the documentation"
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--quiet", "--nolock", "--cores", "1",
                           *sorted(targets), "--config", "profile=smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"targets {sorted(targets)}:\n{(proc.stdout + proc.stderr)[-3000:]}"


# ------------------------------------------------------------------------------------------------
# links and paths
# ------------------------------------------------------------------------------------------------


def anchor(heading: str) -> str:
    """GitHub's heading id: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {anchor(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue   # https:, mailto:
        file, _, fragment = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.is_file() or ROOT not in path.parents:
            broken.append(target)
        elif fragment and path.suffix == ".md" and fragment not in anchors_of(path):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_relative_links_resolve(page):
    assert not broken_links(page), f"{rel(page)}: links to nothing: {broken_links(page)}"


def test_files_cite_only_docs_that_exist():
    sources = [*ROOT.glob("src/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("config/*.yaml"), ROOT / "Snakefile",
               ROOT / "params.yaml", ROOT / "Makefile", *ROOT.glob("workflow/**/*.*"), *ROOT.glob("scripts/*")]
    missing = sorted({f"{rel(f)}: {m}" for f in sources if f.is_file()
                      for m in re.findall(r"\bdocs/[\w./-]*\w", f.read_text(encoding="utf-8", errors="replace"))
                      if not (ROOT / m).exists()})
    assert not missing, missing


def test_the_documentation_shows_commands():
    """The extraction itself: a page without commands would make the tests above vacuous."""
    assert len(REFILLED) >= 10 and len(SNAKEMAKE) >= 10
    assert ("README.md", "snakemake --cores 16 all --config profile=paper") in COMMANDS
