"""Discovery through entry points, duplicate and unknown names, third-party packages."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest

from nestar_lab.cli import main
from nestar_lab.config.registry import PluginError, Registry, get_registry, make_manager
from nestar_lab.hookspecs import KINDS, hookimpl


def test_every_kind_has_builtin_plugins():
    reg = get_registry()
    for kind in KINDS:
        assert reg.names(kind), f"no {kind} plugins registered"
    assert {"euler", "midpoint", "rk4", "dopri5"} <= set(reg.names("ode_solver"))
    assert {"velocity_matching", "none"} <= set(reg.names("coordination_objective"))
    assert {"raster", "zorder", "coarse_to_fine"} <= set(reg.names("token_order"))


def test_builtins_come_from_the_entry_point_group():
    assert all(info.provider.startswith("nestar-lab") for info in get_registry().all())


def test_unknown_name_lists_existing():
    with pytest.raises(PluginError, match=r"unknown ode_solver 'rk5'.*euler.*rk4"):
        get_registry().get("ode_solver", "rk5")


def test_duplicate_name_names_both_providers():
    class Extra:
        @hookimpl
        def nestar_register_ode_solvers(self):
            return {"euler": get_registry().get("ode_solver", "midpoint")}

    reg = Registry(make_manager(extra_plugins=(Extra(),)))  # the other plugins stay usable
    both = r"two ode_solver plugins are named 'euler': one from nestar-lab 0.1.0 \(ode_solvers\), one from .*Extra"
    with pytest.raises(PluginError, match=both):
        reg.get("ode_solver", "euler")
    (problem,) = reg.problems  # reported once, one line
    assert re.match(both, problem.message) and "\n" not in problem.message and not problem.broken
    assert reg.get("ode_solver", "rk4") is get_registry().get("ode_solver", "rk4")


def test_a_hook_that_raises_is_a_problem_not_a_crash():
    class Raises:
        @hookimpl
        def nestar_register_metrics(self):
            raise ImportError("needs a package that is missing")

    reg = Registry(make_manager(extra_plugins=(Raises(),)))
    (problem,) = reg.problems
    assert "nestar_register_metrics failed (ImportError: needs a package that is missing)" in problem.message
    with pytest.raises(PluginError, match="unknown metric 'x'.*perhaps it is in a package that failed to load"):
        reg.get("metric", "x")
    assert reg.names("ode_solver")


@pytest.mark.parametrize("given, why", [
    ("metric_class", r"ode_solver 'solver_x' is .*ClassAccuracy, a metric plugin; ode_solver plugins subclass"),
    ("plain_class", r"ode_solver 'solver_x' is .*Plain, no nestar_lab plugin class"),
    ("instance", r"ode_solver 'solver_x' is .*, not a class"),
])  # fmt: skip
def test_a_class_of_another_kind_is_refused_when_it_registers(given, why):
    class Plain:
        pass

    value = {"metric_class": get_registry().get("metric", "class_accuracy"), "plain_class": Plain,
             "instance": get_registry().get("ode_solver", "euler")()}[given]  # fmt: skip

    class Wrong:
        @hookimpl
        def nestar_register_ode_solvers(self):
            return {"solver_x": value}

    reg = Registry(make_manager(extra_plugins=(Wrong(),)))
    (problem,) = reg.problems
    assert re.search(why, problem.message) and "\n" not in problem.message, problem.message
    assert "solver_x" not in reg.names("ode_solver") and reg.names("ode_solver")
    with pytest.raises(PluginError, match="unknown ode_solver 'solver_x'.*failed to load"):
        reg.get("ode_solver", "solver_x")


def test_misspelt_hook_fails_loudly():
    class Typo:
        @hookimpl
        def nestar_register_ode_solver(self):  # missing the final "s"
            return {}

    with pytest.raises(Exception, match="nestar_register_ode_solver"):
        make_manager(extra_plugins=(Typo(),))


def test_third_party_package_is_discovered_by_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "my_nestar_solver"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from nestar_lab.hookspecs import hookimpl
        from nestar_plugins.ode_solvers.torchdiffeq_solvers import FixedGridSolver

        class Ralston(FixedGridSolver):
            """Third-party test solver."""
            method = "midpoint"

        @hookimpl
        def nestar_register_ode_solvers():
            return {"ralston_test": Ralston}
    '''))
    dist = tmp_path / "my_nestar_solver-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-nestar-solver\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[nestar_lab]\nmy_nestar_solver = my_nestar_solver\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry(make_manager())
    info = reg.info("ode_solver", "ralston_test")
    assert "my-nestar-solver 0.3" in info.provider
    sys.modules.pop("my_nestar_solver", None)


def test_plugins_command_lists_kind_name_provider(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["generator", "nestar"] and "nestar-lab" in line for line in out.splitlines())
