"""The import rule of pyproject.toml's [tool.importlinter]: `topics` at the bottom, the shared
parts (`vectorstore`, `images`) above it, the two services (`workers`, `streams`) beside each
other and never importing one another, the composition root (`vlm4rec`) on top."""

from __future__ import annotations

import ast
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


def _calls(path: Path) -> set[str]:
    """Names called in a module (`f(...)` and `x.f(...)` both as `f`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
    return names


def _attributes(path: Path) -> set[str]:
    return {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}


def test_one_place_builds_a_vector_store_from_the_settings() -> None:
    """`vlm4rec/wiring.py` constructs the Milvus store and clients; the rest of the composition
    root asks it (the local stack's port probe excepted: it runs before there are settings)."""
    builders = {"MilvusVectorStore", "milvus_client", "MilvusClient"}
    allowed = {REPO / "vlm4rec" / "wiring.py", REPO / "vlm4rec" / "localstack" / "__init__.py"}
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "vlm4rec").rglob("*.py"))
        if path not in allowed and _calls(path) & builders
    ]
    assert offenders == []
    assert "MilvusVectorStore" in _calls(REPO / "vlm4rec" / "wiring.py")


def test_one_place_reads_the_kafka_security_settings() -> None:
    """The settings' Kafka security fields become one `topics.connection.KafkaConnection`;
    nothing else translates them (they were translated twice, once per client library)."""
    fields = {"kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password",
              "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"}
    readers = [
        str(path.relative_to(REPO))
        for package in ("topics", "images", "vectorstore", "workers", "streams", "vlm4rec")
        for path in sorted((REPO / package).rglob("*.py"))
        if _attributes(path) & fields
    ]
    assert readers == ["vlm4rec/settings.py"]
