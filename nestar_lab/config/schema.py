"""The experiment config's schema: pydantic models for every section, no behaviour beyond field
checks (``config.py`` reads, overrides and validates a whole config against it)."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from nestar_lab.method.flow import FlowConfig
from nestar_lab.method.sample import SampleConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ComponentSpec(Strict):
    """One part of an experiment: a registered plugin name and its params."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    # The plugin's validated ``Params`` (set by ``config.validate_config``); ``params`` is its
    # JSON form, what configs store. Not a field: equality and dumps see ``name`` and ``params``.
    _validated: Any = PrivateAttr(default=None)

    @classmethod
    def resolved(cls, name: str, validated: BaseModel) -> ComponentSpec:
        """The spec of plugin ``name`` whose params were validated into ``validated``."""
        spec = cls(name=name, params=validated.model_dump(mode="json"))
        spec._validated = validated
        return spec

    def params_for(self, plugin_cls: type) -> Any:
        """The ``Params`` object plugin class ``plugin_cls`` receives: the one validation made, when
        it was made by this class's ``Params`` and ``params`` still says the same (a copy with
        other params, e.g. ``model_copy(update=...)``, carries the old object along); else (a
        config built without ``validate_config``, or changed since) validated now."""
        held = self._validated
        if type(held) is plugin_cls.Params and held.model_dump(mode="json") == self.params:
            return held
        return plugin_cls.Params.model_validate(self.params)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ComponentSpec):
            return NotImplemented
        return (self.name, self.params) == (other.name, other.params)

    __hash__ = None  # mutable, like every pydantic model


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
    max_nonfinite_steps: int = Field(
        10, ge=1, description="steps in a row with a non-finite loss or gradient (each skipped) before the run fails"
    )
    module_schedule: Literal["joint", "progressive"] = Field(
        "joint", description="progressive: modules pre-trained one at a time, then jointly"
    )
    progressive_fraction: float = Field(0.5, ge=0, lt=1, description="share of steps spent pre-training")
    compile: bool = Field(
        False,
        description="torch.compile each scale module's blocks and velocity head (not the whole step: loss, "
        "backward and optimiser stay eager); no gain measured on a 2-core CPU, GPU gain not yet measured",
    )
    compile_backend: str = Field("inductor", description="torch.compile backend (eager: tracing only, for tests)")


class EvalConfig(Strict):
    """How many samples the metrics see and with which seed."""

    samples_per_class: int = Field(100, ge=1)
    seed: int = 1234


class DataConfig(Strict):
    """Where training batches come from (``nestar_lab/run/data.py``) and how the latent cache is made."""

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


class PartSettings(Strict):
    """One module's change to a shared part: ``params`` merged over the shared part's params, or
    another plugin ``name`` (then ``params`` start from that plugin's defaults, not the shared ones)."""

    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    # ``(shared, (name, params), part)`` from validation: the part this module uses, with
    # validated params, for the shared part and the entry it was merged from (a copy with other
    # settings does not use it). Not a field (equality and dumps ignore it).
    _resolved: Any = PrivateAttr(default=None)

    def over(self, shared: ComponentSpec) -> ComponentSpec:
        """The part this module uses."""
        if self._resolved is not None and self._resolved[:2] == (shared, (self.name, self.params)):
            return self._resolved[2]
        if self.name is None or self.name == shared.name:
            return ComponentSpec(name=shared.name, params={**shared.params, **self.params})
        return ComponentSpec(name=self.name, params=dict(self.params))

    def remember(self, shared: ComponentSpec, part: ComponentSpec) -> None:
        """Keep ``part`` (validated) as what :meth:`over` returns for ``shared``."""
        self._resolved = (shared, (self.name, copy.deepcopy(self.params)), part)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartSettings):
            return NotImplemented
        return (self.name, self.params) == (other.name, other.params)

    __hash__ = None


class ModuleSettings(Strict):
    """Settings of one module (an entry of ``modules:``), each merged over the shared setting."""

    scale_module: PartSettings | None = Field(None, description="this module's network (width, depth, heads, ...)")
    ode_solver: PartSettings | None = Field(None, description="the solver of this module's patches")
    cfg_scale: float | None = Field(None, ge=0, description="this module's guidance scale (default sample.cfg_scale)")


MODULE_PARTS = ("scale_module", "ode_solver")  # the parts a module entry may change


COMPONENT_KINDS = {
    "dataset": "dataset",
    "tokenizer": "tokenizer",
    "token_order": "token_order",
    "scale_module": "scale_module",
    "generator": "generator",
    "ode_solver": "ode_solver",
    "coordination": "coordination_objective",
}
#: config fields that hold a list of parts, and their kind
LISTED_KINDS = {"metrics": "metric", "loggers": "logger"}


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
    loggers: list[ComponentSpec] = Field(
        default_factory=list, description="where training curves go besides train_log.jsonl: tensorboard, wandb, mlflow"
    )
    modules: dict[int, ModuleSettings] = Field(
        default_factory=dict, description="per-module settings by module number (1 = first), merged over the shared ones"
    )

    def module_part(self, part: Literal["scale_module", "ode_solver"], stage: int) -> ComponentSpec:
        """Part ``part`` of module ``stage + 1`` (``stage`` counts from 0, as the schedule's stages
        do): its ``modules:`` entry merged over the shared part, or the shared part."""
        entry = self.modules.get(stage + 1)
        change = getattr(entry, part) if entry is not None else None
        return getattr(self, part) if change is None else change.over(getattr(self, part))

    def module_sample(self, stage: int) -> SampleConfig:
        """The sample settings of module ``stage + 1``: ``sample`` with the module's ``cfg_scale``."""
        entry = self.modules.get(stage + 1)
        if entry is None or entry.cfg_scale is None:
            return self.sample
        return self.sample.model_copy(update={"cfg_scale": entry.cfg_scale})
