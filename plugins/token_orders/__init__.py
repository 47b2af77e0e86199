"""Built-in token orders."""

from nestar_plugins.token_orders.orders import CoarseToFine, Raster, ZOrder

from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_token_orders():
    return {"raster": Raster, "zorder": ZOrder, "coarse_to_fine": CoarseToFine}
