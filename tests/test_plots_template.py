"""The offline template for `dvc plots show` (flows.plots)."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest

from flows import plots


def _tarball(path, member: str, text: str):
    with tarfile.open(path, "w:gz") as tar:
        data = text.encode()
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("bad", ["</script>", "{plot_divs}", "{refresh_tag}", "{scripts}"])
def test_a_script_that_would_break_the_page_is_refused(tmp_path, bad):
    tarball = _tarball(tmp_path / "x.tgz", "package/build/x.min.js", f"var a='{bad}';")
    with pytest.raises(plots.TemplateError, match="cannot inline"):
        plots._script(tarball, "package/build/x.min.js")


def test_a_missing_member_is_named(tmp_path):
    tarball = _tarball(tmp_path / "x.tgz", "package/other.js", "1")
    with pytest.raises(plots.TemplateError, match=r"has no file package/build/x\.min\.js"):
        plots._script(tarball, "package/build/x.min.js")


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to fetch vega's scripts")
def test_template_inlines_the_scripts_dvc_would_fetch(tmp_path):
    out = tmp_path / "offline.html"
    assert plots.main(["--out", str(out)]) == 0
    page = out.read_text()
    assert "{plot_divs}" in page and "{refresh_tag}" in page and "{scripts}" not in page
    for package, (version, _) in plots.SCRIPTS.items():
        assert f"/* {package}@{version} */" in page
    assert "<script src" not in page
    # the versions are the ones DVC's renderer loads from its CDN
    from dvc_render.vega import VegaRenderer

    for package, (version, _) in plots.SCRIPTS.items():
        assert f"npm/{package}@{version}" in VegaRenderer.SCRIPTS
    before = out.stat().st_mtime_ns
    assert plots.main(["--out", str(out), "--if-missing"]) == 0
    assert out.stat().st_mtime_ns == before
