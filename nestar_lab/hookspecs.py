"""The hooks a plugin implements: one per kind, each returning ``{name: class}``.

This is the only file a plugin author must read. A plugin package declares an entry point in
the ``nestar_lab`` group pointing at a module (or object) with one or more of these functions
decorated with :data:`hookimpl`::

    # my_package/plugins.py
    from nestar_lab.hookspecs import hookimpl

    @hookimpl
    def nestar_register_ode_solvers():
        return {"my_solver": MySolver}

    # my_package's pyproject.toml
    [project.entry-points.nestar_lab]
    my_package = "my_package.plugins"

Each class subclasses its kind's interface (``interfaces.Dataset``, ..., ``generator.Generator``;
checked when it registers: a class of another kind is skipped with a warning naming it), has a
nested pydantic ``Params`` model and a constructor taking a ``Params``
instance plus the keyword arguments its kind's interface documents (see ``interfaces``).
"""

from __future__ import annotations

import pluggy

from nestar_lab import interfaces

PROJECT = "nestar_lab"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def nestar_register_datasets() -> dict[str, type[interfaces.Dataset]]:
    """Datasets: images in [-1, 1] and integer labels, split into train and test."""


@hookspec
def nestar_register_tokenizers() -> dict[str, type[interfaces.Tokenizer]]:
    """Tokenizers: images <-> continuous latent grid ``(B, c, h, w)``."""


@hookspec
def nestar_register_token_orders() -> dict[str, type[interfaces.TokenOrder]]:
    """Token orders: latent grid <-> 1-D generation order, with each token's 2-D coordinate."""


@hookspec
def nestar_register_scale_modules() -> dict[str, type[interfaces.ScaleModule]]:
    """Scale modules: the network of one module, context rows -> per-token velocity."""


@hookspec
def nestar_register_generators() -> dict[str, type[interfaces.Plugin]]:
    """Generators: the schedule of which tokens are generated when, by which module. Each class
    subclasses ``nestar_lab.method.generator.Generator`` (typed as its ``Plugin`` base here: the hook
    module stays below the generator in the import graph)."""


@hookspec
def nestar_register_ode_solvers() -> dict[str, type[interfaces.ODESolver]]:
    """ODE solvers: integrate a velocity field from t=0 (noise) to t=1 (data), counting NFE."""


@hookspec
def nestar_register_coordination_objectives() -> dict[str, type[interfaces.CoordinationObjective]]:
    """Coordination objectives: a loss aligning adjacent modules during training."""


@hookspec
def nestar_register_metrics() -> dict[str, type[interfaces.Metric]]:
    """Metrics: numbers computed from a trained run and its samples."""


@hookspec
def nestar_register_loggers() -> dict[str, type[interfaces.RunLogger]]:
    """Run loggers: training curves, evaluation metrics and sample grids sent to a tracking tool."""


KINDS: tuple[str, ...] = (
    "dataset",
    "tokenizer",
    "token_order",
    "scale_module",
    "generator",
    "ode_solver",
    "coordination_objective",
    "metric",
    "logger",
)


def hook_name(kind: str) -> str:
    """The hook that registers plugins of ``kind`` (``dataset`` -> ``nestar_register_datasets``)."""
    return f"nestar_register_{kind}s"
