"""The import rule of pyproject.toml's [tool.importlinter]: `topics` at the bottom, the shared
parts (`vectorstore`, `images`) above it, the two services (`workers`, `streams`) beside each
other and never importing one another, the composition root (`vlm4rec`) on top."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def lint(config: Path) -> subprocess.CompletedProcess[str]:
    if not LINT.exists() and shutil.which("lint-imports") is None:
        pytest.fail("lint-imports is missing: pip install -e '.[dev]' installs import-linter")
    return subprocess.run([str(LINT if LINT.exists() else "lint-imports"), "--config", str(config), "--no-cache"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_imports_follow_the_layers() -> None:
    result = lint(REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_check_sees_the_real_imports(tmp_path: Path) -> None:
    """The same packages with the layers upside down must break: the check reads imports."""
    config = tmp_path / "upside-down.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["topics", "images", "vectorstore", "workers", "streams", "vlm4rec"]\n'
        '[[tool.importlinter.contracts]]\nname = "upside down"\ntype = "layers"\n'
        'layers = ["topics", "vectorstore | images", "workers | streams", "vlm4rec"]\n'
    )
    result = lint(config)
    assert result.returncode != 0 and "BROKEN" in result.stdout
    assert "vlm4rec" in result.stdout and "topics" in result.stdout
