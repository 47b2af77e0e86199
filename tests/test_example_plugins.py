"""The example plugin package in examples/ installs as written, registers its three plugins, trains
with them selected by name, and passes the same contract tests as the built-in plugins."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "nestar-example-plugins"
NAMES = {"ode_solver": "ralston", "coordination_objective": "cosine_matching", "metric": "mean_image_rms"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package pip-installed (no deps, offline) into a target directory of its own; the source
    is copied first so that the build leaves nothing in the repository."""
    tmp = tmp_path_factory.mktemp("example_plugins")
    source, target = tmp / "src", tmp / "site"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--quiet", "--target", str(target), str(source)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def run(args: list[str], site: Path, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_the_package_layout_is_the_one_the_readme_shows():
    files = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert files == ["README.md", "pyproject.toml", *(f"src/nestar_example_plugins/{f}" for f in
                     ("__init__.py", "coordination.py", "metrics.py", "solvers.py"))]  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    assert (PACKAGE / "src/nestar_example_plugins/solvers.py").read_text() in readme
    assert (PACKAGE / "pyproject.toml").read_text() in readme


def test_installed_plugins_are_listed_with_their_provider(installed):
    done = run(["-m", "nestar_lab.cli", "plugins"], installed)
    assert done.returncode == 0, done.stderr
    for kind, name in NAMES.items():
        line = next((ln for ln in done.stdout.splitlines() if f" {name} " in f" {ln} "), None)
        assert line is not None, f"{name} missing from `nestar plugins`:\n{done.stdout}"
        assert "nestar-example-plugins 0.1.0" in line, line


def test_a_run_selects_all_three_by_name(installed, tmp_path):
    raw = copy.deepcopy(TINY)
    raw["output_dir"] = str(tmp_path / "runs")
    raw["ode_solver"] = {"name": "ralston", "params": {"steps": 2}}
    raw["coordination"] = {"name": "cosine_matching", "params": {"weight": 0.2}}
    raw["metrics"] = [{"name": "mean_image_rms"}]
    config = tmp_path / "example.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    done = run(["-m", "nestar_lab.cli", "run", str(config), "--run-dir", str(run_dir)], installed)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert 0 < metrics["mean_image_rms_digits"] < 2
    assert metrics["nfe_per_image"] == 2 * 2 * metrics["sequential_steps"]  # ralston: 2 evaluations x 2 steps
    provenance = (run_dir / "provenance.json").read_text()
    assert "nestar-example-plugins" in provenance


def test_the_contract_tests_cover_the_example_plugins(installed):
    """The built-in contract tests, collected with the package on the path, run over its plugins."""
    tests = ["tests/test_solvers.py", "tests/test_contracts_model.py", "tests/test_metrics.py"]
    done = run(["-m", "pytest", "-o", "addopts=", "-v", "-p", "no:cacheprovider", *tests, "-k", " or ".join(NAMES.values())], installed)
    assert done.returncode == 0, done.stdout[-3000:]
    passed = [ln for ln in done.stdout.splitlines() if "PASSED" in ln]
    for name in NAMES.values():
        assert any(f"[{name}" in ln for ln in passed), f"no contract test ran over {name}:\n{done.stdout[-3000:]}"
