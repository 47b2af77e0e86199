"""Ralston's method: the second-order two-stage Runge-Kutta method with the smallest error bound."""

from nestar_plugins.ode_solvers.torchdiffeq_solvers import FixedGridSolver, Tableau


class Ralston(FixedGridSolver):
    """Ralston's second-order method on a uniform grid of ``steps`` intervals: 2 evaluations per
    step. Declaring a ``tableau`` is all a fixed-step method needs: the built-in integrator runs it
    with no host-device sync per step, and NFE is counted for you."""

    tableau = Tableau(c=(0.0, 2 / 3), a=((), (2 / 3,)), b=(1 / 4, 3 / 4))
