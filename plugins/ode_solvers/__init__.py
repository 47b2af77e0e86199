"""Built-in ODE solvers."""

from nestar_plugins.ode_solvers.torchdiffeq_solvers import RK4, Bosh3, Dopri5, Euler, Heun, Midpoint

from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_ode_solvers():
    return {"euler": Euler, "midpoint": Midpoint, "heun": Heun, "rk4": RK4, "dopri5": Dopri5, "bosh3": Bosh3}
