"""Built-in datasets."""

from nestar_lab.hookspecs import hookimpl
from nestar_plugins.datasets.digits import Digits


@hookimpl
def nestar_register_datasets():
    return {"digits": Digits}
