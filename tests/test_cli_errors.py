"""Bad input on every command line: a few lines on stderr, exit status 2, no traceback; the
traceback with ``-v`` or ``RELAYPIPE_TRACEBACK=1``; a bug keeps its traceback (exit 1).

The commands run for real, as subprocesses: ``python -m flows.stages <stage>`` (what dvc.yaml
runs; against the session's Prefect test server, tests/prefect_fixtures.py),
``python -m relaypipe.stages.<stage>``, ``relaypipe ...`` and ``python -m flows ...``.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from relaypipe import errors
from tests.flow_helpers import flow_env
from tests.pipeline_helpers import ROOT, SMALL_PARAMS, make_repo, tool_env

pytest_plugins = ["tests.prefect_fixtures"]

# "a few lines": the message (a schema violation's runs to 4), and the pointer to -v.
MAX_LINES = 6
# Prefect's own console log lines (Beginning flow run ..., View at ..., Finished in state ...)
PREFECT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")
TRACEBACK = "Traceback (most recent call last)"

PREPARE = {"seed": 0, "difficulty": 1, "terms": 6, "n_train": 40, "n_eval": 8}


def run(*cmd: str | Path, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=ROOT,
        env=env or tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def own_lines(stderr: str) -> list[str]:
    """stderr without Prefect's log lines: what the command itself printed."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not PREFECT_LINE.match(ln)]


def assert_brief(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, a short stderr naming ``words``, no traceback."""
    shown = (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    assert proc.returncode == errors.EXIT_INPUT, shown
    assert "Traceback" not in proc.stderr + proc.stdout, shown
    lines = own_lines(proc.stderr)
    assert 1 <= len(lines) <= MAX_LINES, shown
    for word in words:
        assert word in "\n".join(lines), f"{word!r} not in\n{shown}"


# -- the inputs: one bad thing each ---------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input")
    out = str(root / "problems")

    def params(name: str, text: str) -> Path:
        (root / name).write_text(text)
        return root / name

    frame = pd.DataFrame(
        {
            "problem_id": ["a", "b"],
            "task": ["arith", "arith"],
            "difficulty": [1, -1],  # ProblemSchema: difficulty >= 0
            "question": ["1+2", "2+3"],
            "answer": ["3", "5"],
            "solution": ["", ""],
            "split": ["train", "train"],
        }
    )
    frame.to_parquet(root / "violating.parquet")
    return {
        "malformed_yaml": params("malformed.yaml", "prepare:\n  n_train: [40,\n  n_eval: 8\n"),
        "unknown_key": params(
            "unknown.yaml", yaml.safe_dump({"prepare": {**PREPARE, "n_trian": 3, "out_dir": out}})
        ),
        "wrong_type": params(
            "wrong_type.yaml", yaml.safe_dump({"prepare": {**PREPARE, "n_train": "lots"}})
        ),
        "missing_section": params("other.yaml", yaml.safe_dump({"sft": {}})),
        "missing_params": root / "absent.yaml",
        "schema_violation": params(
            "schema.yaml",
            yaml.safe_dump(
                {
                    "filter": {
                        "problems": str(root / "violating.parquet"),
                        "teacher": {"path": str(root)},
                    }
                }
            ),
        ),
        "moved_key": params(
            "moved.yaml", yaml.safe_dump({"filter": {"teacher_url": "http://x:8000/v1"}})
        ),
        "missing_input": params(
            "missing_input.yaml",
            yaml.safe_dump({"filter": {"problems": str(root / "absent_table.parquet")}}),
        ),
    }


# (case, stage, words the message must hold)
CASES = [
    ("malformed_yaml", "prepare", ["malformed.yaml, line", "not valid YAML"]),
    ("unknown_key", "prepare", ["unknown.yaml:prepare: unknown key(s) n_trian"]),
    ("wrong_type", "prepare", ["wrong_type.yaml:prepare.n_train", "expected int", "'lots'"]),
    ("missing_section", "prepare", ["other.yaml", "no section 'prepare'"]),
    ("missing_params", "prepare", ["absent.yaml", "not found"]),
    ("schema_violation", "filter", ["violating.parquet", "ProblemSchema", "'difficulty'"]),
    ("missing_input", "filter", ["absent_table.parquet"]),
    ("moved_key", "filter", ["moved.yaml:filter.teacher_url moved to filter.teacher.server.url"]),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("case", "stage", "words"), CASES, ids=CASE_IDS)
def test_stage_module_reports_bad_input_briefly(bad, case, stage, words):
    proc = run(sys.executable, "-m", f"relaypipe.stages.{stage}", "--params", bad[case])
    assert_brief(proc, f"relaypipe.stages.{stage}: error:", *words)
    assert "RELAYPIPE_TRACEBACK=1" in proc.stderr  # how to see more


@pytest.mark.parametrize(("case", "stage", "words"), CASES, ids=CASE_IDS)
def test_stage_flow_reports_bad_input_briefly(prefect_api_url, bad, case, stage, words):
    """What dvc.yaml runs: the flow run fails with the message, no traceback logged."""
    env = flow_env(prefect_api_url)
    proc = run(sys.executable, "-m", "flows.stages", stage, "--params", bad[case], env=env)
    assert_brief(proc, f"python -m flows.stages {stage}: error:", *words)
    assert "Finished in state Failed(" in proc.stderr  # Prefect's record of the run
    assert len(proc.stderr.strip().splitlines()) <= MAX_LINES + 4  # + Prefect's 3 or 4


def test_stage_flow_in_python_raises_the_stage_error(prefect_api_url, bad):
    """In Python, a flow (and its plain ``.fn``) raises the stage's own exception; the run's
    state carries the message, with no traceback logged."""
    from flows.stages import FLOWS
    from relaypipe.config import ConfigError

    path = str(bad["unknown_key"])
    with pytest.raises(ConfigError, match="unknown key"):
        FLOWS["prepare"].fn(params_path=path)
    with pytest.raises(ConfigError, match="unknown key"):
        FLOWS["prepare"](params_path=path)
    state = FLOWS["prepare"](params_path=path, return_state=True)
    assert state.is_failed()
    assert state.message.startswith(f"{path}:prepare: unknown key(s) n_trian; allowed: ")


def test_dvc_repro_shows_the_stage_message(prefect_api_url, tmp_path):
    """``python -m flows repro`` (dvc repro): the stage's message, no traceback; with ``-v``
    (dvc's verbose flag) the stage's own traceback as well."""
    params = copy.deepcopy(SMALL_PARAMS)
    params["prepare"]["n_trian"] = 3
    repo = make_repo(tmp_path / "repo", params)
    env = flow_env(prefect_api_url)
    cmd = [sys.executable, "-m", "flows", "repro"]
    proc = subprocess.run(
        [*cmd, "prepare"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    # configure, the first stage, builds every stage's params before anything runs
    assert "params.yaml (preset micro + overrides):prepare: unknown key(s) n_trian" in output
    assert "Running stage 'prepare'" not in output
    assert "Traceback" not in output
    verbose = subprocess.run(
        [*cmd, "-v", "prepare"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert verbose.returncode != 0
    assert 'relaypipe/config.py", line' in verbose.stdout + verbose.stderr  # configure's


# -- the traceback on demand --------------------------------------------------------------


@pytest.mark.parametrize("switch", ["-v", "env"])
def test_stage_module_traceback_on_demand(bad, switch):
    env = {**tool_env(), errors.TRACEBACK_ENV: "1"} if switch == "env" else None
    flag = ["-v"] if switch == "-v" else []
    cmd = [sys.executable, "-m", "relaypipe.stages.prepare", "--params", bad["unknown_key"]]
    proc = run(*cmd, *flag, env=env)
    assert proc.returncode == errors.EXIT_INPUT, proc.stderr
    assert TRACEBACK in proc.stderr and "relaypipe.config.ConfigError" in proc.stderr
    # the message still comes last, where it is read
    assert "unknown key(s) n_trian" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("switch", ["-v", "env"])
def test_stage_flow_traceback_on_demand(prefect_api_url, bad, switch):
    extra = {errors.TRACEBACK_ENV: "1"} if switch == "env" else {}
    flag = ["-v"] if switch == "-v" else []
    cmd = [sys.executable, "-m", "flows.stages", "prepare", "--params", bad["wrong_type"]]
    proc = run(*cmd, *flag, env=flow_env(prefect_api_url, **extra))
    assert proc.returncode == errors.EXIT_INPUT, proc.stderr
    assert TRACEBACK in proc.stderr and "relaypipe.config.ConfigError" in proc.stderr
    assert "prepare.n_train: expected int" in proc.stderr.strip().splitlines()[-1]


# -- a bug is no input error ----------------------------------------------------------------

BUG = "raise RuntimeError('a bug, not bad input')"


def test_a_bug_in_a_stage_module_keeps_its_traceback():
    code = f"from relaypipe import errors; errors.install_excepthook('x'); {BUG}"
    proc = run(sys.executable, "-c", code)
    assert proc.returncode == errors.EXIT_BUG
    assert TRACEBACK in proc.stderr and "RuntimeError: a bug" in proc.stderr


def test_a_bug_in_a_stage_flow_keeps_its_traceback(prefect_api_url, bad):
    code = (
        "import sys, flows.stages as s\n"
        "def broken(stage, params_path):\n"
        f"    {BUG}\n"
        "s.run_stage = broken\n"
        "sys.exit(s.main(['prepare', '--params', sys.argv[1]]))\n"
    )
    proc = run(sys.executable, "-c", code, bad["unknown_key"], env=flow_env(prefect_api_url))
    assert proc.returncode == errors.EXIT_BUG, proc.stderr
    assert TRACEBACK in proc.stderr and "RuntimeError: a bug" in proc.stderr


# -- the relaypipe command line and python -m flows -------------------------------------------

RELAYPIPE = [sys.executable, "-m", "relaypipe.cli"]
DECODE = [*RELAYPIPE, "decode", "--teacher", "/nonexistent/teacher", "--prompt", "1+2"]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--student", "/nonexistent/student"], ["/nonexistent/student", "does not exist"]),
        (["--student", "s", "--max-turns", "many"], ["--max-turns", "invalid int value"]),
        (["--student", "s", "--max-turns", "0"], ["max_turns must be >= 1"]),
        (["--student", "s", "--mode", "fast"], ["--mode", "invalid choice: 'fast'"]),
        (["--student", "s", "--chat-template-kwargs", "[1]"], ["expected a JSON object"]),
        (["--student", "s", "--chat-template-kwargs", "{}", "--raw", "--chat-template"], ["--raw"]),
    ],
    ids=["missing_model", "not_an_int", "out_of_range", "bad_choice", "bad_json", "conflict"],
)
def test_relaypipe_decode_reports_bad_input_briefly(argv, words):
    proc = run(*DECODE, *argv)
    assert_brief(proc, "relaypipe decode: error:", *words)


def test_relaypipe_import_and_flows_report_bad_input_briefly(tmp_path):
    missing = tmp_path / "x.gguf"
    proc = run(*RELAYPIPE, "import", "--gguf", missing, "--out", tmp_path / "out")
    assert_brief(proc, "relaypipe import: error:", str(missing))
    assert not (tmp_path / "out").exists()
    assert_brief(run(*RELAYPIPE), "relaypipe: error:", "required: command")
    # python -m flows: an unknown preset, an unknown stage (params.yaml is not touched)
    assert_brief(run(sys.executable, "-m", "flows", "repro", "--preset", "nope"), "'nope'")
    assert_brief(run(sys.executable, "-m", "flows.stages", "nope"), "invalid choice: 'nope'")


@pytest.mark.parametrize("switch", ["-v", "-v after", "env"])
def test_relaypipe_traceback_on_demand(switch):
    argv = ["decode", "--student", "/nonexistent/student", "--teacher", "t", "--prompt", "1"]
    if switch == "-v":
        argv = ["-v", *argv]
    elif switch == "-v after":
        argv = [*argv, "-v"]
    env = {**tool_env(), errors.TRACEBACK_ENV: "1"} if switch == "env" else None
    proc = run(*RELAYPIPE, *argv, env=env)
    assert proc.returncode == errors.EXIT_INPUT, proc.stderr
    assert TRACEBACK in proc.stderr and "FileNotFoundError" in proc.stderr
    assert "/nonexistent/student" in proc.stderr.strip().splitlines()[-1]


# -- relaypipe.errors itself (in-process) -----------------------------------------------------


def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_what_counts_as_bad_input():
    from relaypipe.config import ConfigError
    from relaypipe.io import ParamsError, SchemaViolation

    assert issubclass(ConfigError, errors.InputError) and issubclass(ConfigError, ValueError)
    for exc in (
        ConfigError("params.yaml:x: bad"),
        ParamsError("params.yaml: no section"),
        SchemaViolation("t.parquet: bad", path=Path("t.parquet"), schema_name="S"),
        FileNotFoundError(2, "No such file or directory", "x.parquet"),
        errors.InputError("bad"),
        yaml.YAMLError("bad yaml"),
    ):
        assert errors.is_input_error(exc), exc
    # a stage module's own check of its input (a plain ValueError raised there)
    from relaypipe.stages.prepare import PrepareParams

    with pytest.raises(ValueError) as info:
        PrepareParams(n_train=0)
    assert errors.is_input_error(info.value)
    # bugs: a ValueError from anywhere but a stage module's own check, a KeyError, ...
    for exc in (ValueError("too many values to unpack"), KeyError("x"), RuntimeError("boom")):
        assert not errors.is_input_error(_raise(exc)), exc


def test_describe_is_one_line_for_yaml_and_os_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("a: [1,\nb: 2\n")
    with pytest.raises(yaml.YAMLError) as info, path.open() as fh:
        yaml.safe_load(fh)
    text = errors.describe(info.value)
    assert "\n" not in text and text.startswith(f"{path}, line ") and "not valid YAML" in text
    missing = FileNotFoundError(2, "No such file or directory", "data/x.parquet")
    assert errors.describe(missing) == "data/x.parquet: No such file or directory"


def test_run_main_statuses(capsys, monkeypatch):
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    assert errors.run_main(lambda: 0, prog="p") == 0
    assert errors.run_main(lambda: None, prog="p") == 0

    def bad_input() -> int:
        raise errors.InputError("params.yaml:x.y: expected int")

    assert errors.run_main(bad_input, prog="p") == errors.EXIT_INPUT
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "p: error: params.yaml:x.y: expected int"
    assert "Traceback" not in err
    assert errors.run_main(bad_input, prog="p", verbose=True) == errors.EXIT_INPUT
    assert TRACEBACK in capsys.readouterr().err
    # a command's own SystemExit("error: ...") leaves with status 2, message kept
    with pytest.raises(SystemExit, match="--x needs --y") as info:
        errors.run_main(lambda: sys.exit("error: --x needs --y"), prog="p")
    assert info.value.code == errors.EXIT_INPUT
    assert capsys.readouterr().err == "p: error: --x needs --y\n"

    def bug() -> int:
        return {}["missing"]

    with pytest.raises(KeyError):  # a bug propagates, traceback and all
        errors.run_main(bug, prog="p")


@pytest.mark.parametrize(("value", "wanted"), [("", False), ("0", False), ("1", True)])
def test_traceback_env_values(monkeypatch, value, wanted):
    monkeypatch.setenv(errors.TRACEBACK_ENV, value)
    assert errors.traceback_wanted() is wanted
    assert errors.traceback_wanted(verbose=True) is True
