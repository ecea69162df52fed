"""params.yaml = a preset + overrides; stage configure writes one config file per stage.

Checked here: how overrides merge and what they may not do, that a stage's config changes
exactly when its params or the code it imports change (the digest), that paths can only be
changed with dvc.yaml, and that a failing configure leaves the previous configs as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flows import configure
from flows.__main__ import PresetError, apply_preset
from flows.stages import STAGES
from relaypipe import presets
from relaypipe.errors import is_input_error
from relaypipe.io import ParamsError

ROOT = Path(__file__).resolve().parents[1]


def _repo(tmp_path: Path, params: str, code: bool = False) -> Path:
    """presets/, dvc.yaml and params.yaml (and a copy of the code when ``code``)."""
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(params)
    if code:
        for package in ("relaypipe", "flows"):
            shutil.copytree(
                ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
            )
    return tmp_path


def _configure(repo: Path, root: Path = ROOT) -> dict:
    return configure.configure(
        repo / "params.yaml", repo / "data/config", repo / "dvc.yaml", root=root
    )


def _config(repo: Path, stage: str) -> dict:
    return yaml.safe_load((repo / "data/config" / f"{stage}.yaml").read_text())


def test_params_yaml_runs_the_micro_preset_unchanged():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == {
        "preset": "micro",
        "overrides": {},
    }
    micro = yaml.safe_load((ROOT / "presets/micro.yaml").read_text())
    assert presets.resolve(ROOT / "params.yaml") == micro


def test_overrides_merge_into_the_preset(tmp_path):
    repo = _repo(
        tmp_path,
        "preset: micro\noverrides:\n  grpo: {trainer: {learning_rate: 1.0e-5}}\n"
        "  prepare: {terms: [4]}\n  filter: {teacher: {server: {url: 'http://127.0.0.1:9/v1'}}}\n",
    )
    got = presets.resolve(repo / "params.yaml")
    micro = yaml.safe_load((ROOT / "presets/micro.yaml").read_text())
    assert got["grpo"]["trainer"]["learning_rate"] == 1e-5
    assert got["grpo"]["trainer"]["max_steps"] == micro["grpo"]["trainer"]["max_steps"]  # kept
    assert got["prepare"]["terms"] == [4]  # a list replaces
    assert got["filter"]["teacher"]["server"] == {"url": "http://127.0.0.1:9/v1"}  # null -> map
    assert got["sft"] == micro["sft"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("preset: nope\n", "no preset 'nope'"),
        ("preset: micro\noverrides: [1]\n", "overrides: expected a mapping"),
        ("preset: micro\noverrides: {grpoo: {x: 1}}\n", "no section(s) grpoo in preset 'micro'"),
        ("preset: micro\ngrpo: {cost_weight: 1}\n", "unknown top-level key(s) grpo"),
    ],
)
def test_a_bad_params_file_names_what_is_wrong(tmp_path, params, message):
    repo = _repo(tmp_path, params)
    with pytest.raises(ParamsError) as info:
        presets.resolve(repo / "params.yaml")
    assert message in str(info.value)
    assert is_input_error(info.value)


def test_malformed_yaml_is_bad_input(tmp_path):
    repo = _repo(tmp_path, "preset: micro\noverrides: {grpo: {\n")
    with pytest.raises(Exception) as info:
        presets.resolve(repo / "params.yaml")
    assert is_input_error(info.value)


def test_configure_writes_one_config_per_stage_with_its_code_digest(tmp_path):
    repo = _repo(tmp_path, "preset: micro\noverrides: {grpo: {cost_weight: 0.25}}\n")
    digests = _configure(repo)
    assert sorted(p.stem for p in (repo / "data/config").iterdir()) == sorted(STAGES)
    grpo = _config(repo, "grpo")
    assert grpo["grpo"]["cost_weight"] == 0.25
    assert grpo["code"] == digests["grpo"] == configure.code_digest("grpo")
    assert len(grpo["code"]["sha256"]) == 64
    # the stage reads the same section from its config as from params.yaml itself
    assert presets.section(repo / "data/config/grpo.yaml", "grpo") == presets.section(
        repo / "params.yaml", "grpo"
    )


def test_a_code_edit_changes_the_config_of_the_stages_that_import_it_only(tmp_path):
    repo = _repo(tmp_path, "preset: micro\noverrides: {}\n", code=True)
    before = {s: configure.code_digest(s, repo) for s in STAGES}
    assert before == {s: configure.code_digest(s, ROOT) for s in STAGES}  # path-independent
    rewards = repo / "relaypipe/train/rewards.py"
    rewards.write_text(rewards.read_text() + "\n# an edit\n")
    after = {s: configure.code_digest(s, repo) for s in STAGES}
    changed = {s for s in STAGES if before[s] != after[s]}
    assert "grpo" in changed  # its reward
    assert "prepare" not in changed and "report" not in changed


def test_a_param_edit_changes_that_stage_config_only(tmp_path):
    repo = _repo(tmp_path, "preset: micro\noverrides: {}\n")
    _configure(repo)
    before = {s: (repo / f"data/config/{s}.yaml").read_bytes() for s in STAGES}
    (repo / "params.yaml").write_text("preset: micro\noverrides: {report: {confidence: 0.9}}\n")
    _configure(repo)
    after = {s: (repo / f"data/config/{s}.yaml").read_bytes() for s in STAGES}
    assert {s for s in STAGES if before[s] != after[s]} == {"report"}


def test_overriding_a_path_alone_fails_and_keeps_the_previous_configs(tmp_path):
    repo = _repo(tmp_path, "preset: micro\noverrides: {}\n")
    _configure(repo)
    before = {p.name: p.read_bytes() for p in (repo / "data/config").iterdir()}
    (repo / "params.yaml").write_text(
        "preset: micro\noverrides: {grpo: {out_model: data/models/elsewhere}}\n"
    )
    with pytest.raises(ParamsError) as info:
        _configure(repo)
    assert "out_model = data/models/elsewhere" in str(info.value)
    assert "dvc.yaml" in str(info.value)
    assert {p.name: p.read_bytes() for p in (repo / "data/config").iterdir()} == before
    assert [p.name for p in repo.joinpath("data").iterdir()] == ["config"]  # no staging left


def test_a_typo_in_an_override_fails_with_its_dotted_path(tmp_path):
    repo = _repo(tmp_path, "preset: micro\noverrides: {sft: {eval_nn: 3}}\n")
    with pytest.raises(Exception) as info:
        _configure(repo)
    assert is_input_error(info.value)
    assert "(preset micro + overrides):sft: unknown key(s) eval_nn" in str(info.value)
    assert not (repo / "data").exists()


def test_every_preset_configures(tmp_path):
    for name in presets.preset_names(ROOT / "params.yaml"):
        repo = _repo(tmp_path / name, f"preset: {name}\noverrides: {{}}\n")
        _configure(repo)
        assert len(list((repo / "data/config").iterdir())) == len(STAGES)


def test_apply_preset_changes_the_preset_line_only(tmp_path):
    params = "# my notes\npreset: micro\noverrides:\n  grpo: {cost_weight: 0.3}  # mine\n"
    repo = _repo(tmp_path, params)
    assert apply_preset("smollm2-cpu", str(repo)) is True
    text = (repo / "params.yaml").read_text()
    assert text == params.replace("preset: micro", "preset: smollm2-cpu")
    assert apply_preset("smollm2-cpu", str(repo)) is False
    with pytest.raises(PresetError, match="no preset 'nope'"):
        apply_preset("nope", str(repo))
    (repo / "params.yaml").write_text("prepare: {seed: 7}\n")  # sections of one's own
    with pytest.raises(PresetError, match="no `preset:` key"):
        apply_preset("micro", str(repo))
    assert (repo / "params.yaml").read_text() == "prepare: {seed: 7}\n"
