"""Report-only dependencies are extras: without one, the product runs, and a command that needs
it says how to install it (at its start, not after minutes of work)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_evaluate import make_dataset
from vlm4rec.cli import main
from vlm4rec.extras import MissingExtra, require


def hide(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make `import module` fail as it would where the extra is not installed."""
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def test_a_missing_extra_names_its_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "psutil")
    with pytest.raises(MissingExtra, match=r"pip install -e '\.\[measure\]'"):
        require("psutil", "measure", "a test")
    assert require("json", "measure", "a test") is json


@pytest.mark.parametrize("command", [["soak", "--minutes", "1"], ["bench", "stream", "."]])
def test_measuring_commands_stop_at_once_without_psutil(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: list[str]) -> None:
    hide(monkeypatch, "psutil")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, command, env={"VLM4REC_DATA_DIR": str(tmp_path / "state")})
    assert result.exit_code != 0
    assert "psutil" in result.output and "pip install -e '.[measure]'" in result.output
    assert list(tmp_path.iterdir()) == [], "nothing started, nothing written"


def test_eval_without_matplotlib_writes_its_figures_and_says_how_to_get_the_chart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hide(monkeypatch, "matplotlib")
    folder = make_dataset(tmp_path / "data", [("u", "h1", 1), ("u", "h2", 2), ("v", "x", 3), ("u", "x", 4), ("w", "h1", 5), ("w", "x", 6)])
    out = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(
        main, ["eval", str(folder), "--out", str(out), "--methods", "popularity"], env={"VLM4REC_DATA_DIR": str(tmp_path / "state")}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["methods"]["popularity"]["HR@10"] >= 0
    assert out.with_suffix(".md").exists() and not out.with_suffix(".png").exists()
    assert "pip install -e '.[measure]'" in caplog.text
