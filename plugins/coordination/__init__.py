"""Built-in coordination objectives."""

from nestar_plugins.coordination.objectives import DataMatching, NoCoordination, VelocityMatching
from nestar_plugins.coordination.ramped import RampedVelocityMatching

from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_coordination_objectives():
    return {"none": NoCoordination, "velocity_matching": VelocityMatching, "data_matching": DataMatching,
            "velocity_matching_ramp": RampedVelocityMatching}  # fmt: skip
