"""Built-in scale modules."""

from nestar_plugins.scale_modules.transformer import Transformer

from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_scale_modules():
    return {"transformer": Transformer}
