"""``relaypipe bench`` on tiny random models: the JSON it writes and the CLI wiring."""

from __future__ import annotations

import argparse
import json
import math

import pandas as pd
import pytest

from relaypipe import bench, cli_bench


@pytest.fixture(scope="module")
def pair_dirs(tiny_models, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    dirs = []
    for name, model in zip(("student", "teacher"), tiny_models, strict=True):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(str(root / name))
    problems = root / "problems.parquet"
    pd.DataFrame({"question": ["1+2", "33+4", "5+6+7"], "answer": ["3", "37", "18"]}).to_parquet(
        problems
    )
    return dirs[0], dirs[1], str(problems)


def _finite_positive(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_bench_writes_finite_positive_ratios(pair_dirs, tmp_path, capsys):
    student, teacher, problems = pair_dirs
    out = tmp_path / "bench.json"
    argv = [
        *("--student", student, "--teacher", teacher, "--problems", problems),
        *("--batch-sizes", "1,2", "--router-ps", "0,0.3", "--n-prompts", "2"),
        *("--max-new-tokens", "6", "--repeats", "1", "--out", str(out)),
    ]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["config"]["batch_sizes"] == [1, 2] and res["config"]["n_prompts"] == 2
    assert [r["batch_size"] for r in res["results"]] == [1, 2]
    for row in res["results"]:
        for mode in ("student_only", "teacher_only", "generate"):
            assert _finite_positive(row[mode]["tokens_per_s"]) and row[mode]["tokens"] > 0
        assert _finite_positive(row["student_over_generate"])
        assert 0 <= row["generate"]["same_tokens_as_student_only"] <= 1
        for who in ("student", "teacher"):
            assert _finite_positive(row["prefill_s_per_token"][who])
            assert row["decode_s_per_token"][who] >= 0
        assert [r["router_p"] for r in row["relay"]] == [0.0, 0.3]
        for rel in row["relay"]:
            for key in ("tokens_per_s", "floor_seconds", "relay_over_floor"):
                assert _finite_positive(rel[key]), key
            for key in ("relay_over_teacher_only", "relay_over_student_only"):
                assert _finite_positive(rel[key]), key
            assert 0 <= rel["call_ratio"] <= 1
        assert row["relay"][0]["teacher_tokens"] == 0  # p = 0: the student alone
    names = {t["name"] for t in res["targets"]}
    assert names == set(bench.TARGETS)
    assert all(t["batch_size"] == 2 for t in res["targets"])  # the nearest to 8 measured
    table = capsys.readouterr().out
    assert "relay 0.3" in table and "target relay_over_floor" in table


def test_cli_subcommand_parses_and_runs(pair_dirs, tmp_path):
    student, teacher, problems = pair_dirs
    parser = argparse.ArgumentParser(prog="relaypipe")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_bench.add_parser(sub)
    args = parser.parse_args(
        [
            *("bench", "--student", student, "--teacher", teacher, "--problems", problems),
            *("--batch-sizes", "2", "--router-ps", "0.5", "--n-prompts", "2"),
            *("--max-new-tokens", "3", "--repeats", "1", "--threads", "1"),
        ]
    )
    assert args.command == "bench" and args.out is None
    assert cli_bench.run(args) == 0


def test_bad_options_are_refused(pair_dirs):
    student, teacher, problems = pair_dirs
    base = ["--student", student, "--teacher", teacher, "--problems", problems]
    with pytest.raises(SystemExit, match="batch-sizes"):
        bench.main([*base, "--batch-sizes", "0"])
    with pytest.raises(SystemExit, match="router-ps"):
        bench.main([*base, "--router-ps", "1.5"])
