"""Built-in datasets."""

from nestar_plugins.datasets.digits import Digits
from nestar_plugins.datasets.image_folder import ImageFolder
from nestar_plugins.datasets.image_patches import ImagePatches

from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_datasets():
    return {"digits": Digits, "image_patches": ImagePatches, "image_folder": ImageFolder}
