"""Experiment configs: strict pydantic models, dotted overrides, and whole-config validation.

Every part of an experiment is ``{name: ..., params: {...}}``; the plugin's own ``Params``
model validates ``params``. :func:`load_config` checks everything (structure, plugin names,
plugin params, rules across parts) before any work starts and raises :class:`ConfigError`
with one readable line per problem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nestar_lab.flow import FlowConfig
from nestar_lab.registry import PluginError, get_registry


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(Strict):
    """One part of an experiment: a registered plugin name and its params."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Strict):
    """The optimiser, its schedule, EMA, precision and checkpointing."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(50, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables clipping")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    label_dropout: float = Field(0.1, ge=0, le=1, description="probability of the null label (for CFG)")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    module_schedule: Literal["joint", "progressive"] = Field(
        "joint", description="progressive: modules pre-trained one at a time, then jointly"
    )
    progressive_fraction: float = Field(0.5, ge=0, lt=1, description="share of steps spent pre-training")
    compile: bool = Field(False, description="torch.compile the scale modules' parts (GPU; no gain on this CPU)")
    compile_backend: str = Field("inductor", description="torch.compile backend (eager: tracing only, for tests)")


class SampleConfig(Strict):
    """Sampling: guidance, temperature, batch size."""

    cfg_scale: float = Field(2.0, ge=0)
    cfg_schedule: Literal["constant", "linear"] = "constant"
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(256, ge=1)

    def scale_at(self, tokens_done: int, num_tokens: int) -> float:
        """Guidance for a step after which ``tokens_done`` tokens exist (linear: 1 -> cfg_scale)."""
        if self.cfg_schedule == "constant":
            return self.cfg_scale
        return 1.0 + (self.cfg_scale - 1.0) * tokens_done / num_tokens


class EvalConfig(Strict):
    """How many samples the metrics see and with which seed."""

    samples_per_class: int = Field(100, ge=1)
    seed: int = 1234


class DataConfig(Strict):
    """Where training batches come from (``nestar_lab/data.py``) and how the latent cache is made."""

    source: Literal["auto", "memory", "stream", "latent_cache"] = Field(
        "auto", description="auto: latent_cache when one is set, memory for in-memory datasets, else stream"
    )
    latent_cache: str | None = Field(None, description="directory of `nestar cache-latents` output")
    hflip: bool = Field(False, description="random horizontal flips (cached as a second view)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes for streamed data")
    shard_size: int = Field(10000, ge=1, description="items per latent-cache shard")
    cache_batch_size: int = Field(64, ge=1, description="images per tokenizer call when caching")

    @model_validator(mode="after")
    def _cache_needs_a_path(self):
        if self.source == "latent_cache" and not self.latent_cache:
            raise ValueError("source 'latent_cache' needs data.latent_cache=PATH")
        return self


class DistributedConfig(Strict):
    """torch.distributed settings (used when launched by torchrun or with ``--distributed``)."""

    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on CUDA, else gloo")
    find_unused_parameters: bool | None = Field(
        None, description="DDP option; None: on only for progressive module training"
    )


COMPONENT_KINDS = {
    "dataset": "dataset",
    "tokenizer": "tokenizer",
    "token_order": "token_order",
    "scale_module": "scale_module",
    "generator": "generator",
    "ode_solver": "ode_solver",
    "coordination": "coordination_objective",
}


class ExperimentConfig(Strict):
    """A whole experiment. After :func:`validate_config`, every ``params`` has its defaults filled."""

    name: str = "experiment"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs"
    dataset: ComponentSpec
    tokenizer: ComponentSpec
    token_order: ComponentSpec = ComponentSpec(name="raster")
    scale_module: ComponentSpec
    generator: ComponentSpec
    ode_solver: ComponentSpec = ComponentSpec(name="euler")
    coordination: ComponentSpec = ComponentSpec(name="none")
    flow: FlowConfig = FlowConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    data: DataConfig = DataConfig()
    distributed: DistributedConfig = DistributedConfig()
    metrics: list[ComponentSpec] = Field(default_factory=list)


class ConfigError(ValueError):
    """A config is invalid; ``lines`` holds one readable line per problem."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


def _error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        given = e.get("input")
        given_s = "nothing" if e["type"] == "missing" else repr(given)
        if len(given_s) > 60:
            given_s = given_s[:57] + "..."
        lines.append(f"{path or '<config>'}: got {given_s}; {e['msg'][0].lower() + e['msg'][1:]}")
    return lines


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected KEY=VALUE, e.g. generator.params.k=4"])
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"--set {key}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping"])
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _parse_value(text: str) -> Any:
    """YAML scalars and flow collections; also ``3e-4``, which YAML 1.1 reads as a string."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or a one-line :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({str(exc).splitlines()[0]})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of config sections, got {type(raw).__name__}"])
    return raw


def _resolve_component(where: str, kind: str, spec: ComponentSpec, errors: list[str]) -> ComponentSpec:
    try:
        cls = get_registry().get(kind, spec.name)
    except PluginError as exc:
        errors.append(f"{where}.name: {exc}")
        return spec
    try:
        params = cls.Params.model_validate(spec.params)
    except ValidationError as exc:
        errors.extend(_error_lines(exc, f"{where}.params"))
        return spec
    return ComponentSpec(name=spec.name, params=params.model_dump(mode="json"))


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw config dict completely; raise :class:`ConfigError` listing every problem."""
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_error_lines(exc)) from None
    errors: list[str] = []
    updates = {
        field: _resolve_component(field, kind, getattr(cfg, field), errors)
        for field, kind in COMPONENT_KINDS.items()
    }
    updates["metrics"] = [
        _resolve_component(f"metrics.{i}", "metric", spec, errors) for i, spec in enumerate(cfg.metrics)
    ]
    if errors:
        raise ConfigError(errors)
    cfg = cfg.model_copy(update=updates)
    from nestar_lab.experiment import check_compatibility

    errors = check_compatibility(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment config file."""
    return validate_config(apply_overrides(read_yaml(path), overrides or []))


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (reloadable with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
