"""nestar_lab's example plugin package: one hook implementation per kind it provides."""

from nestar_example_plugins.coordination import CosineMatching
from nestar_example_plugins.metrics import MeanImageRMS
from nestar_example_plugins.solvers import Ralston
from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_ode_solvers():
    return {"ralston": Ralston}


@hookimpl
def nestar_register_coordination_objectives():
    return {"cosine_matching": CosineMatching}


@hookimpl
def nestar_register_metrics():
    return {"mean_image_rms": MeanImageRMS}
