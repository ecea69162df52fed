"""An HTML template that makes ``dvc plots show`` render offline.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so on a machine without
internet (a GPU node, a plane) the page is blank. This builds a template that carries those
three scripts inline, from the npm packages of the very versions DVC's renderer asks for, and
DVC uses it through ``plots.html_template`` in ``.dvc/config``:

    python -m flows.plots            # writes .dvc/plots/offline.html (make setup runs it)

The template leaves out DVC's ``{scripts}`` placeholder, which is where DVC would put the CDN
tags. It needs ``npm`` once, to download the packages (``npm pack`` verifies their integrity
against the registry); the page it produces needs nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from relaypipe.io import atomic_path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots" / "offline.html"

# package -> (version, file in its npm tarball): the versions dvc_render's vega renderer loads.
SCRIPTS: dict[str, tuple[str, str]] = {
    "vega": ("5.20.2", "package/build/vega.min.js"),
    "vega-lite": ("5.2.0", "package/build/vega-lite.min.js"),
    "vega-embed": ("6.18.2", "package/build/vega-embed.min.js"),
}

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>relaypipe plots</title>
    <!-- inlined by python -m flows.plots, so that this page renders offline -->
%s
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


class TemplateError(RuntimeError):
    """The template could not be built (no npm, no registry, an unexpected package)."""


def _npm_pack(spec: str, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise TemplateError(
            "npm is not installed: it is needed once to download vega's scripts "
            "(Debian: apt install npm); without the template, dvc plots show needs internet"
        )
    proc = subprocess.run(
        [npm, "pack", spec, "--pack-destination", str(dest), "--silent"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise TemplateError(f"npm pack {spec} failed: {proc.stderr.strip()[-500:]}")
    return dest / proc.stdout.strip().splitlines()[-1]


def _script(tarball: Path, member: str) -> str:
    with tarfile.open(tarball) as tar:
        try:
            source = tar.extractfile(member)
        except KeyError:
            source = None
        if source is None:
            raise TemplateError(f"{tarball.name} has no file {member}")
        text = source.read().decode("utf-8")
    # The page is filled by str.replace of these placeholders and ends a script at "</script".
    for bad in ("</script", "{plot_divs}", "{refresh_tag}", "{scripts}"):
        if bad in text:
            raise TemplateError(f"{tarball.name}:{member} contains {bad!r}; cannot inline it")
    return text


def build(path: Path = TEMPLATE) -> Path:
    """Download the scripts and write the template to ``path`` (atomically)."""
    with tempfile.TemporaryDirectory() as tmp:
        blocks = []
        for package, (version, member) in SCRIPTS.items():
            tarball = _npm_pack(f"{package}@{version}", Path(tmp))
            blocks.append(
                f'    <script type="text/javascript">/* {package}@{version} */\n'
                f"{_script(tarball, member)}\n    </script>"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as out:
        out.write_text(PAGE % "\n".join(blocks))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.plots", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=TEMPLATE, help="(default: %(default)s)")
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when the template exists"
    )
    args = parser.parse_args(argv)
    if args.if_missing and args.out.is_file():
        return 0
    try:
        print(f"wrote {build(args.out)}")
    except TemplateError as exc:
        print(f"flows.plots: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
