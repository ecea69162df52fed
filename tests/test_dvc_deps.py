"""Every project file a stage imports is covered by DVC: configure hashes it into the stage's
config file (its dep), so editing it re-runs the stage."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from flows import deps
from flows.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_covers_every_stage_import_closure():
    gaps = deps.missing(ROOT / "dvc.yaml")
    assert not gaps, "".join(f"\n{stage}: {', '.join(files)}" for stage, files in gaps.items())


def test_every_stage_of_flows_is_a_dvc_stage():
    assert set(deps.load_stages(ROOT / "dvc.yaml")) == {deps.CONFIGURE, *STAGES}


@pytest.mark.parametrize(
    ("stage", "needs"),
    [
        # the gaps found by hand before deps were generated
        ("grpo", "relaypipe/tasks/grading.py"),  # its reward grades with it
        ("sft", "relaypipe/relay/decoder.py"),  # its check decodes with the relay
        ("evaluate", "relaypipe/schemas.py"),
        ("prepare", "relaypipe/stages/prepare.py"),
    ],
)
def test_the_closure_holds_what_a_stage_runs(stage, needs):
    assert needs in deps.stage_closure(stage)


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_closure_follows_lazy_relative_and_from_imports(tmp_path):
    _tree(
        tmp_path,
        {
            "flows/__init__.py": "",
            "flows/stages.py": "from relaypipe.config import build\n",
            "relaypipe/__init__.py": "",
            "relaypipe/config.py": "",
            "relaypipe/stages/__init__.py": "",
            "relaypipe/stages/s.py": """
                from . import helper
                from ..util import tools
                def run(params):
                    import relaypipe.lazy.deep
                    try:
                        from relaypipe import optional
                    except ImportError:
                        pass
                """,
            "relaypipe/stages/helper.py": "import json\n",
            "relaypipe/util/__init__.py": "",
            "relaypipe/util/tools.py": "",
            "relaypipe/util/unused.py": "",
            "relaypipe/lazy/__init__.py": "",
            "relaypipe/lazy/deep.py": "from relaypipe.util.tools import x\n",
            "relaypipe/optional.py": "",
            "relaypipe/never.py": "",
        },
    )
    got = deps.closure(["flows.stages", "relaypipe.stages.s"], tmp_path)
    assert got == {
        "flows/__init__.py",
        "flows/stages.py",
        "relaypipe/__init__.py",
        "relaypipe/config.py",
        "relaypipe/stages/__init__.py",
        "relaypipe/stages/s.py",
        "relaypipe/stages/helper.py",
        "relaypipe/util/__init__.py",
        "relaypipe/util/tools.py",
        "relaypipe/lazy/__init__.py",
        "relaypipe/lazy/deep.py",
        "relaypipe/optional.py",
    }


def test_a_dropped_code_dep_of_configure_is_reported(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    text = (ROOT / "dvc.yaml").read_text()
    assert "      - relaypipe\n" in text
    dvc_yaml.write_text(text.replace("      - relaypipe\n", "", 1))
    gaps = deps.missing(dvc_yaml)
    assert set(gaps) == {deps.CONFIGURE, *STAGES}  # every stage imports relaypipe
    assert "configure deps miss relaypipe/train/rewards.py" in gaps["grpo"]
    assert "relaypipe/presets.py" in gaps["configure"]


def test_a_stage_without_its_config_dep_is_reported(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    text = (ROOT / "dvc.yaml").read_text()
    dvc_yaml.write_text(text.replace("      - data/config/sft.yaml\n", ""))
    assert deps.missing(dvc_yaml) == {"sft": ["no dep on data/config/sft.yaml"]}


def test_check_command_exits_nonzero_on_a_gap(tmp_path, capsys):
    dvc_yaml = tmp_path / "dvc.yaml"
    shutil.copy(ROOT / "dvc.yaml", dvc_yaml)
    dvc_yaml.write_text(dvc_yaml.read_text().replace("      - flows\n", "", 1))
    assert deps.main(["--check", "--dvc-yaml", str(dvc_yaml)]) == 1
    assert "flows/stages.py" in capsys.readouterr().out
    assert deps.main(["--check", "--dvc-yaml", str(ROOT / "dvc.yaml")]) == 0
