"""Contract tests over every registered ODE solver, on ODEs with exact solutions."""

from __future__ import annotations

import math

import pytest
import torch

from nestar_lab.config.registry import get_registry

SOLVERS = get_registry().names("ode_solver")
FIXED_EVALS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def make(name, **params):
    cls = get_registry().get("ode_solver", name)
    return cls(cls.Params(**params))


@pytest.mark.parametrize("name", SOLVERS)
def test_constant_field_is_solved_exactly(name):
    y0 = torch.randn(3, 5, 2, dtype=torch.float64)
    v = torch.randn(3, 5, 2, dtype=torch.float64)
    result = make(name).integrate(lambda t, y: v.expand_as(y), y0)
    torch.testing.assert_close(result.y1, y0 + v, rtol=1e-10, atol=1e-10)
    assert result.nfe >= 1


@pytest.mark.parametrize("name", SOLVERS)
def test_linear_ode_is_accurate_and_t_is_a_scalar(name):
    y0 = torch.rand(4, 3, 1, dtype=torch.float64) * 2 - 1
    seen = []

    def field(t, y):
        seen.append(t.dim())
        return -2.0 * y + t

    result = make(name).integrate(field, y0)
    exact = (y0 + 0.25) * math.exp(-2.0) + 0.25  # y(t) = (y0 + 1/4) e^{-2t} + t/2 - 1/4
    assert torch.allclose(result.y1, exact, atol=0.05), name
    assert set(seen) == {0}


@pytest.mark.parametrize("name", sorted(set(SOLVERS) & set(FIXED_EVALS)))
def test_fixed_solvers_count_evaluations(name):
    steps = 7
    result = make(name, steps=steps).integrate(lambda t, y: -y, torch.ones(2, 1))
    assert result.nfe == FIXED_EVALS[name] * steps


def _order(name: str) -> float:
    y0 = torch.ones(1, dtype=torch.float64)
    exact = math.exp(-1.0)
    errs = [abs(float(make(name, steps=n).integrate(lambda t, y: -y, y0).y1) - exact) for n in (8, 16)]
    return math.log2(errs[0] / errs[1])


def test_convergence_orders():
    assert abs(_order("euler") - 1) < 0.15
    assert abs(_order("midpoint") - 2) < 0.2
    assert abs(_order("rk4") - 4) < 0.3


@pytest.mark.parametrize("name", ["dopri5", "bosh3"])
def test_adaptive_tolerance_controls_error_and_cost(name):
    y0 = torch.ones(1, dtype=torch.float64)
    loose = make(name, rtol=1e-2, atol=1e-2).integrate(lambda t, y: -5 * y, y0)
    tight = make(name, rtol=1e-8, atol=1e-8).integrate(lambda t, y: -5 * y, y0)
    exact = math.exp(-5.0)
    assert abs(float(tight.y1) - exact) < 1e-6
    assert tight.nfe > loose.nfe


# ------------------------------------------------------------------ native fixed grids, sync-free
@pytest.mark.parametrize("name,method", [("euler", "euler"), ("midpoint", "midpoint"), ("heun", "heun2"), ("rk4", "rk4")])
def test_native_fixed_grid_matches_torchdiffeq(name, method):
    from torchdiffeq import odeint

    y0 = torch.randn(3, 4, 2, dtype=torch.float64)

    def field(t, y):  # nonlinear and time-dependent, so every stage's time and weight matter
        return torch.sin(3 * t) * y - y**3 + t**2

    grid = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    reference = odeint(field, y0, grid, method=method)[-1]
    torch.testing.assert_close(make(name, steps=5).integrate(field, y0).y1, reference, rtol=1e-12, atol=1e-12)


class _Conversions:
    """Counts tensor -> Python conversions (each one a host-device sync on a GPU)."""

    NAMES = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist")

    def __init__(self, monkeypatch):
        self.count = 0
        for attr in self.NAMES:
            original = getattr(torch.Tensor, attr)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.Tensor, attr, counted)


@pytest.mark.parametrize("name", sorted(FIXED_EVALS))
def test_fixed_solvers_convert_nothing_per_step(name, monkeypatch):
    conversions = _Conversions(monkeypatch)
    counts = []
    for steps in (2, 9):
        conversions.count = 0
        make(name, steps=steps).integrate(lambda t, y: torch.cos(t) * y, torch.ones(2, 3))
        counts.append(conversions.count)
    assert counts == [0, 0], counts


def test_a_sampling_call_converts_as_often_at_any_step_count(tiny_raw, monkeypatch):
    """Tensor -> Python conversions in one whole sampling call do not grow with the solver steps."""
    from nestar_lab.config.validation import validate_config
    from nestar_lab.method.sample import Sampler
    from nestar_lab.run.experiment import build_experiment

    counts = {}
    for steps in (2, 8):
        tiny_raw["ode_solver"]["params"]["steps"] = steps
        exp = build_experiment(validate_config(tiny_raw))
        sampler = Sampler(exp.generator.eval(), exp.tokenizer, exp.order, exp.sampling_plan())
        sampler(torch.tensor([0, 1]), seed=0)  # warm-up: lazily built buffers
        with monkeypatch.context() as m:
            conversions = _Conversions(m)
            sampler(torch.tensor([0, 1]), seed=0)
        counts[steps] = conversions.count
    assert counts[2] == counts[8], counts


def test_a_method_only_subclass_still_runs_through_torchdiffeq():
    from nestar_plugins.ode_solvers.torchdiffeq_solvers import FixedGridSolver

    class ThirdOrderHeun(FixedGridSolver):  # torchdiffeq has it, the native table does not
        method = "heun3"

    solver = ThirdOrderHeun(ThirdOrderHeun.Params(steps=8))
    result = solver.integrate(lambda t, y: -y, torch.ones(1, dtype=torch.float64))
    assert abs(float(result.y1) - math.exp(-1.0)) < 1e-4
    assert result.nfe >= 8
