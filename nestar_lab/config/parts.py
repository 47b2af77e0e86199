"""Plugins from validated specs, and the rules across parts of a config.

Below ``config`` and ``experiment`` in the import order: ``config.validate_config`` runs
:func:`check_compatibility` and ``experiment.build_experiment`` uses :func:`make`, so this module
imports neither (``cfg`` is an ``ExperimentConfig``, ``component`` a ``ComponentSpec``, used by
their fields only).
"""

from __future__ import annotations

import torch

from nestar_lab.config.registry import get_registry
from nestar_lab.method.capture import why_not_capturable


def make(kind: str, component, **kwargs):
    """Instantiate plugin ``component.name`` of ``kind`` with the ``Params`` validation made."""
    cls = get_registry().get(kind, component.name)
    return cls(component.params_for(cls), **kwargs)


def data_parts(cfg):
    """The dataset, tokenizer and token order of ``cfg`` (an ``ExperimentConfig``)."""
    dataset = make("dataset", cfg.dataset)
    tokenizer = make("tokenizer", cfg.tokenizer, image_shape=dataset.image_shape)
    order = make("token_order", cfg.token_order, grid=tokenizer.latent_shape[1:])
    return dataset, tokenizer, order


#: the config sections the rules across parts read (``check_compatibility``)
RULE_SECTIONS = ("dataset", "tokenizer", "token_order", "generator", "modules", "scale_module", "sample", "device",
                 "ode_solver")


def check_compatibility(cfg) -> list[str]:
    """Rules across parts (image size vs tokenizer, token count vs schedule), as error lines.

    Cheap: the tokenizer's latent shape comes from its class (``latent_shape_for``, no network,
    no weights), and the schedule is the one the generator will use (``schedule_for``)."""
    registry = get_registry()
    try:
        dataset = make("dataset", cfg.dataset)  # knows image_shape without loading data
    except (ValueError, FileNotFoundError) as exc:
        return [f"dataset.params: {exc}"]
    try:
        tok_cls = registry.get("tokenizer", cfg.tokenizer.name)
        latent_shape = tok_cls.latent_shape_for(cfg.tokenizer.params_for(tok_cls), dataset.image_shape)
        order = make("token_order", cfg.token_order, grid=latent_shape[1:])
    except (ValueError, FileNotFoundError) as exc:
        return [f"tokenizer.params: {exc}"]
    gen_cls = registry.get("generator", cfg.generator.name)
    gen_params = cfg.generator.params_for(gen_cls)
    try:
        schedule = gen_cls.schedule_for(gen_params, order.num_tokens)
    except ValueError as exc:
        return [f"generator.params: {exc} (the tokenizer makes {order.num_tokens} tokens)"]
    num_modules = len(schedule.stages)
    return check_modules(cfg, num_modules, gen_cls.shares_weights(gen_params)) + check_capture(cfg, num_modules)


def check_modules(cfg, num_modules: int, shared: bool) -> list[str]:
    """``modules:`` against the schedule: every number names a module (1..M, M the schedule's
    stages), and sizes differ per module only where each module has its own network."""
    errors = []
    for number, entry in sorted(cfg.modules.items()):
        if number > num_modules:
            errors.append(f"modules.{number}: {cfg.generator.name} has {num_modules} module"
                          f"{'s' if num_modules > 1 else ''} here (modules.1..{num_modules})")  # fmt: skip
        elif entry.scale_module is not None and shared and num_modules > 1:
            errors.append(f"modules.{number}.scale_module: one network runs all {num_modules} modules "
                          f"(share_weights), so sizes cannot differ per module; set scale_module.params, "
                          f"or generator.params.share_weights: false where the generator has it")  # fmt: skip
    return errors


def check_capture(cfg, num_modules: int) -> list[str]:
    """``sample.capture: on`` only where every module's solve can be captured (CUDA, a fixed-step
    solver): otherwise one line with the reason (``auto`` falls back to eager by itself)."""
    if cfg.sample.capture != "on":
        return []
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    for stage in range(num_modules):
        reason = why_not_capturable(make("ode_solver", cfg.module_part("ode_solver", stage)), device)
        if reason is not None:
            return [f"sample.capture: on is impossible here: {reason}; set sample.capture: auto or off"]
    return []
