"""Built-in tokenizers."""

from nestar_plugins.tokenizers.diffusers_vae import DiffusersVAE
from nestar_plugins.tokenizers.kl16 import KL16
from nestar_plugins.tokenizers.pixels import Pixels

from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_tokenizers():
    return {"pixels": Pixels, "kl16": KL16, "diffusers_vae": DiffusersVAE}
