"""The man pages: generated from the parsers and the shipped config, so the committed ones must
be what the generator writes now; and they must render without a warning."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cmsod import config, ctl, daemon

ROOT = Path(__file__).parent.parent
MAN = ROOT / "man"
PAGES = ["cmsod.8", "cmsoctl.1", "cmsod.toml.5"]


def test_the_committed_pages_are_what_the_generator_writes() -> None:
    result = subprocess.run(
        [sys.executable, str(MAN / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def rendered(page: str) -> str:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-P-cbou", "-rLL=200n", MAN / page],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return result.stdout


@pytest.mark.parametrize("page", PAGES)
def test_a_page_renders_without_warnings(page: str) -> None:
    assert "NAME" in rendered(page)


def test_every_option_and_command_is_on_its_page() -> None:
    """A second look, on the rendered text, that the generator misses none."""
    pages = {p: rendered(p).replace("\u2010", "-").replace("\u2212", "-") for p in PAGES}
    for action in daemon.parser()._actions:
        for flag in action.option_strings:
            assert flag in pages["cmsod.8"], flag
    for name in ("submit", "approve", "gantt", "blackout add", "watch", "metrics", "--timeout"):
        assert name in pages["cmsoctl.1"], name
    for action in ctl.parser()._actions:
        for flag in set(action.option_strings) - {"-h", "--help"}:
            assert flag in pages["cmsoctl.1"], flag


def test_every_config_key_is_on_the_config_page_with_its_default() -> None:
    page = rendered("cmsod.toml.5").replace("\u2010", "-").replace("\u2212", "-")
    shipped = tomllib.loads((ROOT / "etc" / "cmsod" / "cmsod.toml").read_text())
    for section in config.Config.__struct_fields__:
        assert f"[{section}]" in page, section
        for key in getattr(config.Config(), section).__struct_fields__:
            assert f"{key} = " in page, f"{section}.{key}"
    assert 'listen = ""' in page and shipped["metrics"]["listen"] == ""
