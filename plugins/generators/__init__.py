"""Built-in generators."""

from nestar_plugins.generators.baselines import AR
from nestar_plugins.generators.dit import DiT
from nestar_plugins.generators.mar import MAR
from nestar_plugins.generators.nestar import NestAR
from nestar_plugins.generators.var import VAR

from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_generators():
    return {"nestar": NestAR, "ar": AR, "dit": DiT, "mar": MAR, "var": VAR}
