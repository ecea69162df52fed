"""``python -m flows``: run DVC with one Prefect server for the whole run, or the pipeline flow.

    python -m flows repro [dvc repro args]    # what `make run` does
    python -m flows repro --preset smollm2-cpu  # `preset: smollm2-cpu` in params.yaml first
    python -m flows exec -- dvc exp run -S +overrides.grpo.cost_weight=0.3
    python -m flows pipeline --set +overrides.grpo.cost_weight=0.3 [--target grpo] [--no-push]
    python -m flows stages                    # the stage -> module registry

``repro`` and ``exec``: every stage of a ``dvc repro`` is its own process and Prefect flow run.
When no Prefect server is configured (``PREFECT_API_URL`` in the environment or the active
profile), each of them would otherwise start a temporary server of its own, tens of seconds
apiece. These commands start ``prefect server start`` on 127.0.0.1 once, point the stages at
it, and stop it afterwards; its UI shows the runs while they go. A configured server is used
as is; a ``repro`` with nothing to do (``dvc status`` clean) starts no server at all.

Bad input (an unknown preset, a missing file) is one line on stderr and exit status 2; a stage
that fails inside ``dvc repro`` prints its own short message (see :mod:`relaypipe.errors`).
``repro -v`` (dvc's verbose flag) also sets ``RELAYPIPE_TRACEBACK=1``, so a failing stage shows
its full traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

import flows  # noqa: F401  (Prefect setting defaults, before anything imports Prefect)
from relaypipe import errors

PROG = "python -m flows"


def dvc_exe() -> str:
    """The ``dvc`` of this interpreter's environment first (``make run`` has it on PATH)."""
    return shutil.which("dvc", path=tool_path()) or "dvc"


def prefect_api_configured() -> bool:
    """Whether a Prefect server is configured (environment or active profile)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def dvc_up_to_date() -> bool:
    """``dvc status -q`` exits 0 when every stage is up to date."""
    return subprocess.run([dvc_exe(), "status", "-q"], stdin=subprocess.DEVNULL).returncode == 0


def tool_path() -> str:
    """PATH with this interpreter's directory first, so ``dvc`` and the stages' ``python`` come
    from this environment even when it is not activated (``.venv/bin/python -m flows ...``)."""
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def with_server(cmd: Sequence[str]) -> int:
    """Run ``cmd`` with ``PREFECT_API_URL`` pointing at a server (started here if need be)."""
    env = {**os.environ, "PATH": tool_path()}
    exe = shutil.which(cmd[0], path=env["PATH"])
    if exe is None:
        print(f"python -m flows: command not found: {cmd[0]}", file=sys.stderr)
        return 127
    cmd = [exe, *cmd[1:]]
    if prefect_api_configured():
        return subprocess.call(cmd, env=env)
    from flows.server import local_server

    print("starting a Prefect server on 127.0.0.1 for this run ...", file=sys.stderr, flush=True)
    with local_server() as server:
        print(f"Prefect UI: {server.ui_url}", file=sys.stderr, flush=True)
        env["PREFECT_API_URL"] = server.api_url
        try:
            return subprocess.call(cmd, env=env)
        except KeyboardInterrupt:  # dvc got the same Ctrl-C; stop the server and go
            return 130


class PresetError(errors.InputError):
    """A preset that cannot be applied; the message says why and what to do."""


def apply_preset(name: str, repo: str = ".") -> bool:
    """Set ``preset: <name>`` in ``params.yaml``; True when it changed.

    Only that line changes: comments and your ``overrides`` stay (configure then lays them over
    the new preset, and fails with the dotted key if one does not fit it). DVC sees the change
    like any other params edit, so ``dvc exp show`` and ``dvc params diff`` show the preset.
    """
    import re
    from pathlib import Path

    import yaml

    from relaypipe.presets import preset_names

    params = Path(repo) / "params.yaml"
    names = preset_names(params)
    if name not in names:
        raise PresetError(f"no preset {name!r}; choose one of {', '.join(names)}")
    text = params.read_text() if params.exists() else ""
    data = yaml.safe_load(text) if text.strip() else {"preset": None}
    if not isinstance(data, dict) or "preset" not in data:
        raise PresetError(
            f"{params} has no `preset:` key (it holds stage sections of its own); to run a "
            f"preset, make it `preset: {name}` with your changes under `overrides:`"
        )
    if data["preset"] == name:
        return False
    if text.strip():
        new = re.sub(r"^preset:.*$", f"preset: {name}", text, count=1, flags=re.M)
    else:
        new = f"preset: {name}\noverrides: {{}}\n"
    if (yaml.safe_load(new) or {}).get("preset") != name:
        raise PresetError(f"{params}: could not set `preset: {name}`; edit the file by hand")
    tmp = params.with_name(".params.yaml.tmp")
    tmp.write_text(new)
    os.replace(tmp, params)
    return True


def wants_verbose(dvc_args: Sequence[str]) -> bool:
    """Whether dvc is asked to be verbose (``-v``, ``-vv``, ``--verbose``)."""
    return any(a == "--verbose" or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in dvc_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    repro = sub.add_parser(
        "repro",
        help="dvc repro with one Prefect server for all stages",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    repro.add_argument(
        "--preset",
        help="set `preset: NAME` in params.yaml first (presets/NAME.yaml; micro: the "
        "project's default); none: params.yaml as it is",
    )
    repro.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed to dvc repro")
    run = sub.add_parser("exec", help="any command with one Prefect server (after --)")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    pipe = sub.add_parser(
        "pipeline",
        help="run the pipeline flow here (pull, repro, push)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pipe.add_argument("--repo", default=".", help="repository")
    pipe.add_argument("--target", action="append", default=[], help="stage (repeatable)")
    pipe.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="dvc exp run -S"
    )
    pipe.add_argument("--name", help="experiment name (none: a plain dvc repro)")
    pipe.add_argument("--remote", help="DVC remote (none: the default remote)")
    pipe.add_argument("--no-pull", action="store_true", help="skip dvc pull")
    pipe.add_argument("--no-push", action="store_true", help="skip dvc push")
    pipe.add_argument("--force", action="store_true", help="dvc repro --force")
    sub.add_parser("stages", help="list the stage flows")
    # parse_known_args: argparse's REMAINDER does not take options that come first
    # (`repro -f prepare`), so those come back as unknown and go to dvc in their order.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "repro":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "exec" and not (args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd):
        parser.error("exec needs a command, e.g. python -m flows exec -- dvc repro")
    return errors.run_main(lambda: run_command(args, unknown), prog=PROG)


def run_command(args: argparse.Namespace, unknown: list[str]) -> int:
    """The parsed command (:func:`main` reports bad input in it briefly)."""
    if args.command == "repro":
        if args.preset:
            changed = apply_preset(args.preset)  # PresetError: one line, exit 2
            if changed:
                print(
                    f"params.yaml: preset {args.preset} (your overrides kept; "
                    "make run PRESET=micro goes back to the default)",
                    file=sys.stderr,
                )
        dvc_args = [*unknown, *args.dvc_args]
        if wants_verbose(dvc_args):
            errors.want_tracebacks()  # the stages' full tracebacks too (the env is inherited)
        if not dvc_args and dvc_up_to_date():
            print("every stage is up to date", file=sys.stderr)
            return 0
        return with_server([dvc_exe(), "repro", *dvc_args])
    if args.command == "exec":
        return with_server(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    if args.command == "pipeline":
        from flows.pipeline import pipeline

        state = pipeline(
            repo_dir=args.repo,
            targets=args.target,
            set_params=args.set,
            exp_name=args.name,
            remote=args.remote,
            pull=not args.no_pull,
            push=not args.no_push,
            force=args.force,
            return_state=True,
        )
        return 0 if state.is_completed() else 1
    from flows.stages import STAGES

    for stage, module in STAGES.items():
        print(f"{stage}\t{module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
