"""Degenerate runs fail loudly (relaypipe/checks.py), shown by runs that are degenerate.

Each stage test runs the real stage on tiny local models that learn nothing: a bootstrap pair
trained for one step (it never writes an answer line), a random student whose warm-up table is
reference rows only, an SFT run at learning rate 0, a GRPO run whose reward is constant. The
stage must fail with a message naming the cause and the param, leave its previous outputs
byte-identical, and, with ``allow_degenerate: true``, go on and record the warning in its
metrics.json, from where the report stage puts it at the top of report.md (and in summary.json;
its metrics.json counts them). The report's cost
reductions are null with a reason when there is nothing to compare.
"""

from __future__ import annotations

import doctest
import json
import os
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from relaypipe import checks
from relaypipe.checks import DegenerateRunError
from relaypipe.io import read_table, write_json, write_table
from relaypipe.micro.models import ModelSize
from relaypipe.micro.train_lm import TrainSpec
from relaypipe.relay.grammar import strip_calls
from relaypipe.schemas import (
    EvalRequestSchema,
    FilteredProblemSchema,
    ProblemSchema,
    SFTExampleSchema,
)
from relaypipe.stages import bootstrap, grpo, prepare, report, sft, warmup_data
from relaypipe.stages import filter as filter_stage
from relaypipe.teacher import TeacherSpec
from relaypipe.train.warmup import InsertSpec
from tests.test_report import MODELS_JSON, rows

# ------------------------------------------------------------------------------ helpers


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): to show nothing was touched."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def previous_outputs(folder: Path, *names: str) -> dict[str, bytes]:
    """Stand-ins for a previous run's outputs (files, or folders holding a file)."""
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if "." in name:
            path.write_text(f"previous {name}\n")
        else:
            path.mkdir(exist_ok=True)
            (path / "model.safetensors").write_bytes(b"previous weights of " + name.encode())
    return snapshot(folder)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models, tokenizer):
    """Problems from the prepare stage; the untrained tiny pair saved as model folders."""
    root = tmp_path_factory.mktemp("degenerate")
    prepare.run(
        prepare.PrepareParams(terms=3, n_train=16, n_eval=4, out_dir=str(root / "problems"))
    )
    for name, model in zip(("student", "teacher"), tiny_models, strict=True):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


# ------------------------------------------------------------------------------ the checks alone


def test_doctests():
    assert doctest.testmod(checks).failed == 0


@pytest.mark.parametrize(
    ("metrics", "words", "count"),
    [
        # never answers: reported once per model, its accuracy of 0 not blamed on top
        (
            {"student_answered": 0.0, "teacher_answered": 0.0},
            ["student (out/student) wrote no gradable", "teacher (out/teacher) wrote no"],
            2,
        ),
        (
            {"teacher_answered": 0.5, "teacher_accuracy": 0.0},
            ["right on none", "bootstrap.teacher_train.steps"],
            1,
        ),
        (
            {"student_accuracy": 0.5, "teacher_accuracy": 0.5},
            ["not more accurate than the student (0.5)", "no gap"],
            1,
        ),
    ],
)
def test_bootstrap_findings_name_cause_and_param(metrics, words, count):
    base = {
        "n_eval": 4,
        "student_accuracy": 0.0,
        "teacher_accuracy": 0.0,
        "student_answered": 1.0,
        "teacher_answered": 1.0,
    }
    findings = checks.bootstrap_findings({**base, **metrics}, kind="micro", where="out")
    text = "\n".join(findings)
    assert all(w in text for w in words), text
    assert len(findings) == count
    healthy = {**base, "student_accuracy": 0.3, "teacher_accuracy": 0.9}
    assert checks.bootstrap_findings(healthy, kind="micro", where="out") == []


def test_reward_findings_need_every_logged_step_flat():
    flat = [{"frac_reward_zero_std": 1.0, "reward": 0.0}, {"frac_reward_zero_std": 0.9999999}]
    (finding,) = checks.reward_findings([*flat, {"train_runtime": 1.0}], where="live")
    assert "all 2 logged steps" in finding and "grpo.trainer.temperature" in finding
    assert checks.reward_findings([*flat, {"frac_reward_zero_std": 0.5}], where="live") == []
    assert checks.reward_findings([{"loss": 0.0}], where="live") == []  # nothing logged


def test_weights_digest_sees_one_changed_weight(tiny_models):
    model = tiny_models[0]
    before = checks.weights_digest(model)
    assert checks.weights_digest(model) == before
    with torch.no_grad():
        weight = next(model.parameters())
        old = weight[0, 0].item()
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))  # one ulp
        after = checks.weights_digest(model)
        weight[0, 0] = old
    assert after != before and checks.weights_digest(model) == before


# ------------------------------------------------------------------------------ stage bootstrap


def test_bootstrap_of_a_pair_that_never_answers_fails_and_writes_nothing(workdir, tmp_path):
    out = tmp_path / "models"
    before = previous_outputs(out, "student", "teacher", "bootstrap.json")
    tiny = ModelSize(16, 1, 2, 32)
    one_step = TrainSpec(steps=1, batch_size=4, warmup_steps=1)
    params = bootstrap.BootstrapParams(
        student=tiny,
        teacher=tiny,
        student_train=one_step,
        teacher_train=one_step,
        max_new_tokens=12,
        eval_batch_size=4,
        threads=2,
        problems_dir=str(workdir / "problems"),
        out_dir=str(out),
    )
    with pytest.raises(DegenerateRunError) as err:
        bootstrap.run(params)
    message = str(err.value)
    assert "the student" in message and "wrote no gradable final answer" in message
    assert "bootstrap.max_new_tokens" in message and "bootstrap.teacher_train.steps" in message
    assert "bootstrap.allow_degenerate: true" in message
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no staging folder left

    metrics = bootstrap.run(replace(params, allow_degenerate=True))
    assert metrics["student_answered"] == 0.0 and metrics["student_accuracy"] == 0.0
    assert len(metrics["warnings"]) == 2  # student and teacher: neither answers
    assert json.loads((out / "bootstrap.json").read_text())["warnings"] == metrics["warnings"]
    assert (out / "student" / "config.json").is_file()  # the new pair replaced the old one


def test_filter_whose_teacher_solves_nothing_fails_and_writes_nothing(workdir, tmp_path):
    """The untrained tiny teacher solves none: the filter refuses before grpo sees an empty
    table; with allow_degenerate the empty table is published with its warning."""
    out = tmp_path / "filter"
    before = previous_outputs(out, "kept.parquet", "metrics.json")
    params = filter_stage.FilterParams(
        k=2,
        n_problems=4,
        max_new_tokens=8,
        batch_size=8,
        threads=2,
        problems=str(workdir / "problems" / "train.parquet"),
        teacher=TeacherSpec(str(workdir / "teacher")),
        out_dir=str(out),
    )
    with pytest.raises(DegenerateRunError) as err:
        filter_stage.run(params)
    message = str(err.value)
    assert "the teacher solved none of the 4 problems in 2 samples" in message
    assert "filter.k" in message and "filter.allow_degenerate: true" in message
    assert snapshot(out) == before

    metrics = filter_stage.run(replace(params, allow_degenerate=True))
    assert metrics["n_kept"] == 0 and len(metrics["warnings"]) == 1
    assert read_table(out / "kept.parquet", FilteredProblemSchema).empty


# ------------------------------------------------------------------------------ stage warmup_data


def warmup_params(workdir, out, **kw) -> warmup_data.WarmupDataParams:
    return warmup_data.WarmupDataParams(
        insert=kw.pop("insert", InsertSpec()),
        n_problems=4,
        offset=0,
        samples_per_problem=1,
        max_new_tokens=8,
        batch_size=4,
        min_examples=4,
        top_up_with_reference=True,
        device="cpu",
        threads=2,
        problems=str(workdir / "problems" / "train.parquet"),
        student=str(workdir / "student"),
        out_dir=str(out),
        **kw,
    )


def test_warmup_table_of_reference_rows_only_fails_then_is_reported(workdir, tmp_path):
    out = tmp_path / "warmup"
    before = previous_outputs(out, "sft.parquet", "metrics.json")
    with pytest.raises(DegenerateRunError) as err:
        warmup_data.run(warmup_params(workdir, out))
    message = str(err.value)
    assert "all 4 rows of the warm-up table" in message and "reference solutions" in message
    assert "warmup_data.samples_per_problem" in message
    assert snapshot(out) == before

    metrics = warmup_data.run(warmup_params(workdir, out, allow_degenerate=True))
    assert metrics["n_reference_examples"] == metrics["n_examples"] == 4
    (warning,) = metrics["warnings"]
    assert warning.startswith("warmup_data: all 4 rows")
    assert json.loads((out / "metrics.json").read_text())["warnings"] == [warning]

    # the report stage carries the kept run's warning to the top of report.md
    params = report_inputs(tmp_path, benchmark("b1"), stage_metrics=[str(out / "metrics.json")])
    headline = report.run(params)
    assert headline["warnings"] == 1  # metrics.json counts them; summary.json has the text
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"] == [warning]
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("## Warnings: this run is degenerate") < md.index("| mode |")
    assert f"- {warning}" in md


def test_warmup_table_without_commands_fails_naming_max_commands(workdir, tmp_path):
    out = tmp_path / "warmup"
    no_commands = InsertSpec(max_commands=0)
    with pytest.raises(DegenerateRunError, match=r"warmup_data\.insert\.max_commands"):
        warmup_data.run(warmup_params(workdir, out, insert=no_commands))
    assert not out.exists()


def test_mistakes_warmup_reads_reference_solutions_and_drops_rows_over_the_cap(workdir, tmp_path):
    """An untrained student gets most reference tokens wrong: every row needs many calls, so a
    cap of 2 drops them all (a clear error, nothing written), and a high cap keeps them all,
    each reference solution intact around its commands."""
    out = tmp_path / "warmup"
    capped = InsertSpec(policy="mistakes", max_commands=2, n_values=(1, 2))
    with pytest.raises(ValueError, match=r"warmup_data\.insert\.max_commands = 2"):
        warmup_data.run(warmup_params(workdir, out, insert=capped))
    assert not out.exists()
    roomy = InsertSpec(policy="mistakes", max_commands=99, n_values=(1, 2))
    metrics = warmup_data.run(warmup_params(workdir, out, insert=roomy))
    assert metrics["n_examples"] == 4 and metrics["dropped_over_max_commands"] == 0
    assert metrics["n_reference_examples"] == 0 and metrics["student_sample_accuracy"] is None
    table = pd.read_parquet(out / "sft.parquet")
    problems = pd.read_parquet(workdir / "problems" / "train.parquet").head(4)
    assert [strip_calls(c) for c in table.completion] == list(problems.solution)
    assert set(table.policy) == {"mistakes"} and (table.n_commands > 0).all()


# ------------------------------------------------------------------------------ stage sft


def test_sft_that_changes_no_weight_fails_before_saving(workdir, tmp_path, tokenizer):
    table = pd.DataFrame(
        {
            "problem_id": ["a", "b"],
            "prompt": ["Q: 1+2\nA: ", "Q: 3+4\nA: "],
            "completion": ["1+2=3\nAnswer: 3", "3+<call>2</call>4=7\nAnswer: 7"],
            "n_commands": [0, 1],
            "policy": ["random", "random"],
        }
    )
    write_table(table, tmp_path / "sft.parquet", SFTExampleSchema)
    before = previous_outputs(tmp_path / "out", "warmup", "sft/metrics.json")
    params = sft.SFTParams(
        trainer={"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 0.0},
        eval_n=2,
        max_new_tokens=8,
        device="cpu",
        threads=2,
        data=str(tmp_path / "sft.parquet"),
        student=str(workdir / "student"),
        teacher=TeacherSpec(str(workdir / "teacher")),
        eval_problems=str(workdir / "problems" / "eval.parquet"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        out_model=str(tmp_path / "out" / "warmup"),
        out_dir=str(tmp_path / "out" / "sft"),
    )
    with pytest.raises(DegenerateRunError) as err:
        sft.run(params)
    message = str(err.value)
    assert "identical to its input" in message and "sft.trainer.learning_rate" in message
    assert "sft.allow_degenerate: true" in message
    after = snapshot(tmp_path / "out")
    # only the failed run's training curves are new (named in the message, for diagnosis)
    assert {k: v for k, v in after.items() if not k.startswith("sft/live/")} == before
    assert "sft/live" in message.replace(os.sep, "/")

    metrics = sft.run(replace(params, allow_degenerate=True))
    assert len(metrics["warnings"]) == 1 and "identical" in metrics["warnings"][0]
    saved = load_file(tmp_path / "out" / "warmup" / "model.safetensors")
    source = load_file(workdir / "student" / "model.safetensors")
    assert saved.keys() == source.keys()
    assert all(torch.equal(saved[k], source[k]) for k in saved)


# ------------------------------------------------------------------------------ stage grpo


def test_grpo_with_a_constant_reward_fails_then_resumes_with_allow(workdir, tmp_path):
    train = read_table(workdir / "problems" / "train.parquet", ProblemSchema)
    problems = train[:4].assign(teacher_pass_rate=1.0)
    write_table(problems, tmp_path / "kept.parquet", FilteredProblemSchema)
    write_json(tmp_path / "bootstrap.json", {"student_accuracy": 0.0, "teacher_accuracy": 0.0})
    before = previous_outputs(tmp_path / "out", "relay", "grpo/metrics.json")
    params = grpo.GRPOParams(
        trainer={
            "max_steps": 1,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "learning_rate": 1e-2,
            "temperature": 1.0,
            "beta": 0.0,
            "save_steps": 1,
        },
        # a random student is never right: accuracy pays 0 to every rollout of every group
        reward="accuracy",
        eval_n=2,
        max_new_tokens=8,
        device="cpu",
        threads=2,
        problems=str(tmp_path / "kept.parquet"),
        eval_problems=str(workdir / "problems" / "eval.parquet"),
        student=str(workdir / "student"),
        teacher=TeacherSpec(str(workdir / "teacher")),
        bootstrap_metrics=str(tmp_path / "bootstrap.json"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        out_model=str(tmp_path / "out" / "relay"),
        out_dir=str(tmp_path / "out" / "grpo"),
    )
    with pytest.raises(DegenerateRunError) as err:
        grpo.run(params)
    message = str(err.value)
    assert "every group's rollouts earned the same reward" in message
    assert "grpo.trainer.temperature" in message and "grpo.reward" in message
    assert "identical to its input" in message  # zero advantages: no weight moved
    after = snapshot(tmp_path / "out")
    assert {k: v for k, v in after.items() if not k.startswith("grpo/live/")} == before

    # allow_degenerate is not part of the checkpoint fingerprint: this resumes the run above
    metrics = grpo.run(replace(params, allow_degenerate=True))
    assert len(metrics["warnings"]) == 2
    assert metrics["gap_recovered"] is None and "no gap" in metrics["gap_recovered_note"]
    saved = json.loads((tmp_path / "out" / "grpo" / "metrics.json").read_text())
    assert saved["warnings"] == metrics["warnings"]
    assert (tmp_path / "out" / "relay" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------ stage report


def benchmark(name, relay_correct=(1, 1, 0, 0), *, relay_teacher=1, teacher=(1, 1, 1, 1)):
    """A benchmark's eval rows (see tests/test_report.py for the FLOPs of each row)."""
    return [
        *rows(name, "student", [1, 0, 0, 0]),  # 0.25, 10 student tokens
        *rows(name, "teacher", list(teacher), s=0, t=10, sp=0, tp=5, ctx=5, calls=1),
        # relay_teacher=0: no calls, and 12 student tokens, more than the student's 10
        *rows(
            name,
            "relay",
            relay_correct,
            s=12 if relay_teacher == 0 else 9,
            t=relay_teacher,
            tp=10 if relay_teacher else 0,
            ctx=12 if relay_teacher else 0,
            calls=1 if relay_teacher else 0,
        ),
        *rows(name, "random_router", [1, 0, 0, 0], p=0.2, s=8, t=2, tp=10, ctx=20, calls=2),
        *rows(name, "random_router", [1, 1, 1, 0], p=0.6, s=4, t=6, tp=20, ctx=40, calls=5),
    ]


def report_inputs(tmp_path, table, stage_metrics=()) -> report.ReportParams:
    write_table(pd.DataFrame(table), tmp_path / "requests.parquet", EvalRequestSchema)
    write_json(tmp_path / "models.json", MODELS_JSON)
    return report.ReportParams(
        requests=str(tmp_path / "requests.parquet"),
        models=str(tmp_path / "models.json"),
        stage_metrics=list(stage_metrics),
        out_dir=str(tmp_path / "out"),
    )


COSTS = ("cost_reduction_vs_matched_router", "cost_reduction_vs_matched_router_flops")


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        # the relay is the student alone (0.25, at 12 tokens instead of 10): before, the FLOPs
        # "reduction" against the router at p = 0 was 1 - 2*100*22 / (2*100*20) = -0.1
        ({"relay_correct": (1, 0, 0, 0), "relay_teacher": 0}, "made no teacher calls"),
        # no calls, yet more accurate than the student: still no teacher use to reduce
        ({"relay_teacher": 0}, "made no teacher calls"),
        # it calls, but is only as accurate as the student: matched at call ratio 0
        ({"relay_correct": (1, 0, 0, 0)}, "no more accurate than the router at call ratio 0"),
        # the teacher is as weak as the student: no gap, nothing worth buying
        ({"teacher": (1, 0, 0, 0)}, "not more accurate than the student"),
    ],
)
def test_report_has_no_cost_reduction_when_nothing_compares(tmp_path, kw, why):
    params = report_inputs(tmp_path, benchmark("b1", **kw) + benchmark("b2", **kw))
    headline = report.run(params)
    m = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert headline["cost_reduction"] is None and headline["cost_reduction_flops"] is None
    assert headline["warnings"] == len(m["warnings"])
    for key in COSTS:
        assert m[key] is None and why in m["notes"][key], m["notes"]
        for b in ("b1", "b2"):
            assert m["headline_by_benchmark"][b][key] is None
    assert m["matched_router"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| -" not in md.split("## Headline")[1].split("## What each")[0]  # nothing negative
    own = [w for w in m["warnings"] if w.startswith("report: ")]
    if why in ("made no teacher calls", "not more accurate than the student"):
        assert any(why in w for w in own) and "## Warnings" in md
    else:
        # calls that bought nothing: no better than a coin flip spending the same teacher tokens
        assert len(own) == 1 and "no more accurate than a random router" in own[0]
        assert "## Warnings" in md


def test_a_relay_below_the_random_router_at_its_share_is_warned_about(tmp_path):
    """Better than the student, yet no better than a random router with the same teacher
    share: the calls bought nothing a coin flip would not, and the report says so."""
    # the relay at 0.5 with 6 of its 10 tokens from the teacher: the router at call ratio 0.6
    # (its p = 0.6 row) is right 0.75 of the time
    spender = rows("b1", "relay", [1, 1, 0, 0], s=4, t=6, tp=10, ctx=12, calls=2)
    table = [r for r in benchmark("b1") if r["mode"] != "relay"] + spender
    report.run(report_inputs(tmp_path, table))
    m = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert m["modes"]["relay"]["accuracy"] > m["modes"]["student"]["accuracy"]
    assert m["modes"]["random_router"]["accuracy"] == pytest.approx(0.75)
    (own,) = [w for w in m["warnings"] if w.startswith("report: ")]
    assert "no more accurate than a random router" in own and "(0.5)" in own
    assert "## Warnings" in (tmp_path / "out" / "report.md").read_text()
    # the default relay (0.5 at call ratio 0.1, where the router is right 0.25): no warning
    healthy = report_inputs(tmp_path / "ok", benchmark("b1"))
    report.run(healthy)
    ok = json.loads((tmp_path / "ok" / "out" / "summary.json").read_text())
    assert ok["modes"]["relay"]["accuracy"] > ok["modes"]["random_router"]["accuracy"]
    assert ok["warnings"] == []


def test_report_of_a_healthy_relay_has_no_warnings(tmp_path):
    params = report_inputs(tmp_path, benchmark("b1"))
    headline = report.run(params)
    assert headline["warnings"] == 0 and headline["cost_reduction"] > 0
    assert "## Warnings" not in (tmp_path / "out" / "report.md").read_text()
