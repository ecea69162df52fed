"""``relaypipe --help`` is quick: no torch, transformers, trl, prefect or pandas at parse time;
and every option's help shows its default."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from relaypipe import cli
from tests.pipeline_helpers import ROOT

HEAVY = ("torch", "transformers", "trl", "prefect", "pandas")
COMMANDS = [[], ["decode"], ["serve"], ["bench"], ["calibrate"], ["import"]]

PROBE = """
import contextlib, io, json, sys
from relaypipe.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*argv, "--help"])
        except SystemExit as exc:
            codes.append((exc.code, len(out.getvalue())))
print(json.dumps({"codes": codes, "heavy": sorted(m for m in json.loads(sys.argv[2])
                                                  if m in sys.modules)}))
"""


def test_help_imports_no_heavy_module():
    """In a fresh interpreter: every --help exits 0 with text, and imported none of HEAVY."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(COMMANDS), json.dumps(HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert [code for code, _ in found["codes"]] == [0] * len(COMMANDS)
    assert all(size > 200 for _, size in found["codes"])
    assert found["heavy"] == [], f"--help imported {found['heavy']}"


def parsers(parser: argparse.ArgumentParser, name: str = "relaypipe"):
    """``parser`` and every subcommand's parser, with their command names."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text ``--help`` prints for ``action`` (empty when it prints none)."""
    if not (action.help and action.help.strip()):
        return ""
    return parser._get_formatter()._expand_help(action)


def has_no_default(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    """Required, or one of a required either/or group: there is no default to show."""
    return action.required or any(
        group.required and action in group._group_actions
        for group in parser._mutually_exclusive_groups
    )


def options_without_default(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    missing = []
    for name, p in parsers(parser, prog):
        p.format_help()  # every help string expands (no stray %)
        for action in p._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = shown_help(p, action)
            if has_no_default(p, action):
                assert text, f"{name} {action.option_strings[0]}: no help text"
            elif "default" not in text:
                missing.append(f"{name} {'/'.join(action.option_strings)}: {text!r}")
    return missing


def test_every_option_shows_its_default():
    assert options_without_default(cli.build_parser(), "relaypipe") == []


def test_defaults_are_the_real_ones():
    """The text says ``(default: X)`` with X the value argparse uses (spot checks)."""
    help_text = " ".join(
        cli.build_parser()._subparsers._group_actions[0].choices["decode"].format_help().split()
    )
    assert "greedy (default: 0.0)" in help_text
    assert "(default: relay)" in help_text and "(default: 128)" in help_text


def test_stage_and_flow_command_lines_show_defaults_too():
    from flows.__main__ import main as flows_main
    from relaypipe.stages.common import stage_parser

    assert options_without_default(stage_parser("prepare"), "relaypipe.stages.prepare") == []
    with pytest.raises(SystemExit) as info:
        flows_main(["pipeline", "--help"])
    assert info.value.code == 0


def test_decode_modes_match_the_decoder():
    from relaypipe.relay.decoder import MODES

    assert cli.DECODE_MODES == MODES


def test_bench_options_match_the_benchmark_module():
    """cli_bench defines bench's options itself (relaypipe.bench imports torch): same ones."""
    from relaypipe import bench, cli_bench

    ours, theirs = argparse.ArgumentParser(), argparse.ArgumentParser()
    cli_bench.add_arguments(ours)
    bench.add_arguments(theirs)

    def spec(p: argparse.ArgumentParser) -> dict:
        return {a.dest: (a.option_strings, a.default, a.type) for a in p._actions}

    assert spec(ours) == spec(theirs)
    assert cli_bench.DEFAULT_PROBLEMS == bench.DEFAULT_PROBLEMS
