"""Built-in coordination objectives."""

from nestar_lab.hookspecs import hookimpl
from nestar_plugins.coordination.objectives import DataMatching, NoCoordination, VelocityMatching


@hookimpl
def nestar_register_coordination_objectives():
    return {"none": NoCoordination, "velocity_matching": VelocityMatching, "data_matching": DataMatching}
