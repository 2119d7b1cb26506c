"""'Add a method' is first-class: the README's template, copied literally, runs the smoke sweep;
and a method a test registers (a toy, or a plugin imported in-process) does not leak into the next.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PACKAGE_METHODS

import methods
from bench.cli import import_plugins
from bench.testing import temporary_registry
from methods.base import CompressionMethod, register_method

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = str(Path(__file__).parent / "plugins")


def readme_template() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Add a method") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def git_status() -> str:
    try:
        return subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout
    except OSError:
        return ""


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_readme_template_runs_the_smoke_sweep(tmp_path):
    (tmp_path / "my_pruning.py").write_text(readme_template())
    before = git_status()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FREQBENCH_RESULTS": str(tmp_path / "res")}
    contract = subprocess.run(
        [
            sys.executable,
            "-c",
            "import my_pruning; from bench.testing import run_contract; run_contract('my_pruning')",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert contract.returncode == 0, contract.stderr[-2000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.sweep",
            "--study",
            "smoke",
            "--plugin",
            "my_pruning",
            "--set",
            "methods=[my_pruning]",
            "--set",
            "latency.min_run_time=0.01",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"\| my_pruning \|\s+2 \|", proc.stdout), proc.stdout
    assert git_status() == before, "adding a method must not touch any file of the repository"


class _Toy(CompressionMethod):
    name = "toy_leak"
    family = "spatial"


# The next three tests run in this order (pytest keeps a file's order): registering in one test,
# then looking at the registry in the following one.
def test_a_test_registers_a_toy_and_imports_a_plugin(monkeypatch):
    monkeypatch.syspath_prepend(PLUGINS)
    assert methods.list_methods() == list(PACKAGE_METHODS)
    register_method(_Toy)
    import_plugins(["probe_method"])
    assert {"toy_leak", "probe"} <= set(methods.list_methods())


def test_the_next_test_sees_only_the_package_methods(monkeypatch):
    assert methods.list_methods() == list(PACKAGE_METHODS)
    assert "probe_method" not in sys.modules
    # and the plugin registers again when imported again (its module was forgotten too)
    monkeypatch.syspath_prepend(PLUGINS)
    import_plugins(["probe_method"])
    assert "probe" in methods.list_methods()


def test_temporary_registry_restores_inside_one_test():
    with temporary_registry():
        register_method(_Toy)
        assert "toy_leak" in methods.list_methods()
    assert methods.list_methods() == list(PACKAGE_METHODS)
