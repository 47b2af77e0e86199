"""Built-in tokenizers."""

from nestar_lab.hookspecs import hookimpl
from nestar_plugins.tokenizers.pixels import Pixels


@hookimpl
def nestar_register_tokenizers():
    return {"pixels": Pixels}
