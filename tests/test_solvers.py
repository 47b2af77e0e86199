"""Contract tests over every registered ODE solver, on ODEs with exact solutions."""

from __future__ import annotations

import math

import pytest
import torch

from nestar_lab.registry import get_registry

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
