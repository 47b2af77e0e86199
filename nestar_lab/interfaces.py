"""One abstract class per plugin kind: what the core asks of each part of an experiment.

Every plugin class has a nested pydantic ``Params`` model (``extra="forbid"``) and takes an
instance of it as its first constructor argument; the keyword arguments after it are listed on
each base class. Hand-offs between parts are the dataclasses below, not dicts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class Params(BaseModel):
    """Base of every plugin's ``Params``: strict, unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin:
    """Mixin holding the validated params of a plugin. ``plugin_kind``: the kind whose interface a
    class implements (set once on each interface), checked when a plugin registers."""

    Params: ClassVar[type[Params]] = Params
    plugin_kind: ClassVar[str | None] = None

    def __init__(self, params: Params | None = None):
        self.params = params if params is not None else self.Params()


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ImageSplit:
    """A split of a dataset in memory: images in [-1, 1] ``(N, C, H, W)`` and labels ``(N,)``."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class Dataset(Plugin, ABC):
    """Images with integer class labels, split into ``train`` and ``test``. Constructor: ``(params)``.

    ``num_classes`` and ``image_shape`` must be known without loading the data (configs
    validate before work); :meth:`load_splits` runs on first use of :meth:`split`.
    """

    plugin_kind = "dataset"

    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    in_memory: ClassVar[bool] = True  # False: training streams items() (data.source auto)
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")

    def split(self, name: str) -> ImageSplit:
        """The ``train`` or ``test`` split (loaded once)."""
        if name not in self.SPLITS:
            raise ValueError(f"{type(self).__name__} has splits {', '.join(self.SPLITS)}; not {name!r}")
        if getattr(self, "_splits", None) is None:
            self._splits = self.load_splits()
        return self._splits[name]

    @abstractmethod
    def load_splits(self) -> dict[str, ImageSplit]:
        """Every split, keyed by name."""

    def items(self, name: str) -> torch.utils.data.Dataset:
        """A map-style view of a split: ``ds[i] -> (image_CHW in [-1, 1], label)``. Training and
        latent caching read through this; a dataset too large for memory (``image_folder``)
        overrides it to read files lazily. Default: wraps :meth:`split`."""
        s = self.split(name)
        return torch.utils.data.TensorDataset(s.images, s.labels)


# ----------------------------------------------------------------------------- tokens
class Tokenizer(Plugin, nn.Module, ABC):
    """Images ``(B, C, H, W)`` <-> continuous latent grid ``(B, c, h, w)``.

    Constructor: ``(params, image_shape=(C, H, W))``. ``latent_shape`` must be known after
    construction without running a network, so configs validate before any work.
    """

    plugin_kind = "tokenizer"

    latent_shape: tuple[int, int, int]

    def __init__(self, params: Params | None = None, *, image_shape: tuple[int, int, int]):
        nn.Module.__init__(self)
        Plugin.__init__(self, params)
        self.image_shape = tuple(image_shape)

    @classmethod
    def latent_shape_for(cls, params, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The latent shape for validated ``params`` and ``image_shape``; ``ValueError`` when
        impossible. Config validation asks this instead of building the tokenizer, so a check
        reads no weights. Default: build the tokenizer and read its ``latent_shape`` (a
        tokenizer with a network overrides this with arithmetic over its params)."""
        return tuple(cls(params, image_shape=image_shape).latent_shape)

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> latents ``(B, c, h, w)``."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1]."""

    def encode_for_cache(self, images: Tensor) -> Tensor:
        """What the latent cache stores per image (default: :meth:`encode`'s latents). A VAE that
        samples its posterior in training stores the posterior's moments here and draws from them
        in :meth:`latents_from_cache`, as MAR does with its cached moments."""
        return self.encode(images)

    def latents_from_cache(self, cached: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latents ``(B, c, h, w)`` from what :meth:`encode_for_cache` stored (default: as is)."""
        return cached


class TokenOrder(Plugin, ABC):
    """A latent grid in 1-D generation order. Constructor: ``(params, grid=(h, w))``. Subclasses
    define :meth:`order`; flattening, unflattening and coordinates follow from it."""

    plugin_kind = "token_order"

    def __init__(self, params: Params | None = None, *, grid: tuple[int, int]):
        super().__init__(params)
        self.grid = tuple(grid)
        h, w = self.grid
        perm = torch.as_tensor(self.order(h, w), dtype=torch.long)
        if sorted(perm.tolist()) != list(range(h * w)):
            raise ValueError(f"token order {type(self).__name__} is not a permutation of {h}x{w} cells")
        self.perm = perm  # perm[i] = row-major cell index of the i-th generated token
        self.inverse = torch.argsort(perm)
        self.coords = torch.stack([perm // w, perm % w], dim=1).float()  # (n, 2): (row, col)

    @abstractmethod
    def order(self, h: int, w: int) -> list[int]:
        """Row-major cell indices of an ``h x w`` grid in generation order."""

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def flatten(self, latent_BChw: Tensor) -> Tensor:
        """``(B, c, h, w)`` -> tokens ``(B, n, c)`` in generation order."""
        cells_BnC = latent_BChw.flatten(2).transpose(1, 2)
        return cells_BnC[:, self.perm.to(latent_BChw.device)]

    def unflatten(self, tokens_BND: Tensor) -> Tensor:
        """Tokens ``(B, n, c)`` in generation order -> ``(B, c, h, w)``."""
        cells = tokens_BND[:, self.inverse.to(tokens_BND.device)]
        b, _, c = cells.shape
        return cells.transpose(1, 2).reshape(b, c, *self.grid)


# ----------------------------------------------------------------------------- training pass
@dataclass(frozen=True)
class PassOptions:
    """What one training pass (``Generator.training_losses``) computes besides every stage's loss.

    ``stages``: train only these stages (0-based; ``None``: all), as progressive pre-training
    asks (``train.pretrain_steps``); a generator that cannot train a subset raises
    ``ValueError`` (see :meth:`check_one_stage`). ``measure_disagreement``: also log
    ``disagree_m`` between adjacent modules (never part of the loss; a no-op without them).
    ``step``: the training step (0-based), handed to the coordination objective; ``None``
    outside training (a validation pass).
    """

    stages: frozenset[int] | None = None
    measure_disagreement: bool = False
    step: int | None = None

    def __post_init__(self):
        if self.stages is not None:
            object.__setattr__(self, "stages", frozenset(self.stages))

    def check_one_stage(self, who: str) -> None:
        """For a generator with one stage: ``stages`` may only be all of it (``None`` or ``{0}``)."""
        if self.stages is not None and self.stages != {0}:
            raise ValueError(f"{who} trains one stage (stage 0); it cannot train stages {sorted(self.stages)}")


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ScaleModuleSpec:
    """What a scale module needs to know about the problem."""

    token_dim: int
    num_classes: int  # label ``num_classes`` is the learned null class used for CFG
    coords: Tensor  # (n, 2) grid coordinate of each token in generation order
    grid: tuple[int, int]
    num_stages: int  # modules in the schedule (for a stage embedding when weights are shared)


@dataclass(frozen=True)
class Rows:
    """Rows of a scale module's sequence: which token feeds each row and which it predicts.

    ``src_idx == -1`` marks a row fed by the learned start embedding. ``mask`` (``(L, L)`` bool,
    True = may attend) is given for block-causal teacher-forced passes; ``None`` means every row
    sees every row (a cached extension's new rows, or a bidirectional pass such as MAR's).
    ``coords`` and ``stages`` are for rows that are not cells of the token grid (``var``'s
    coarser scales); left ``None``, a module reads positions from ``spec.coords`` and the stage
    from its ``stage`` argument.
    """

    src_idx: Tensor  # (L,), or (B, L) when rows are fed differently per image (MAR's orders)
    tgt_idx: Tensor
    mask: Tensor | None = None
    groups: Tensor | None = None  # (L,) patch id of each row; None: all rows are one patch
    coords: Tensor | None = None  # (L, 2) float grid position of each row (may be fractional)
    stages: Tensor | None = None  # (L,) long stage of each row, when one pass runs several stages

    def __len__(self) -> int:
        return int(self.tgt_idx.shape[0])


class ScaleModule(Plugin, nn.Module, ABC):
    """The network of one module: context rows -> conditioning -> per-token velocity.

    Constructor: ``(params, spec=ScaleModuleSpec)``. A module sees the class label through
    prefix tokens it owns; ``labels == spec.num_classes`` is the null (unconditional) label.
    """

    plugin_kind = "scale_module"

    joint_head: bool = False  # True: the velocity head models a patch's tokens together

    def __init__(self, params: Params | None = None, *, spec: ScaleModuleSpec):
        nn.Module.__init__(self)
        Plugin.__init__(self, params)
        self.spec = spec

    @abstractmethod
    def forward(self, x_in_BLd: Tensor, rows: Rows, labels_B: Tensor, stage: int) -> Tensor:
        """Teacher-forced pass over all rows with ``rows.mask``: conditioning ``(B, L, D)``."""

    def compile_parts(self, backend: str = "inductor") -> None:
        """``torch.compile`` what this module runs (``train.compile``); default: the whole module.
        Modules whose sampling path bypasses ``forward`` compile their parts instead."""
        self.compile(backend=backend)

    @abstractmethod
    def start_cache(self, labels_B: Tensor, stage: int, capacity: int | None = None) -> Any:
        """A key/value cache holding the label prefix, for sampling. ``capacity``: how many rows
        :meth:`extend` will append in all (the sampler knows); a module allocates its cache once
        at that length and writes it in place. ``None``: grow as rows come."""

    @abstractmethod
    def extend(self, x_in_BLd: Tensor, rows: Rows, cache: Any) -> Tensor:
        """Append rows to ``cache``; they see every cached row and each other. -> ``(B, L, D)``."""

    @abstractmethod
    def velocity(self, y_BLd: Tensor, t_BL: Tensor, cond_BLD: Tensor, groups_L: Tensor | None = None) -> Tensor:
        """Velocity of noisy tokens ``y`` at time ``t`` given the conditioning.

        ``y`` and ``t`` may carry extra leading dimensions (several noise draws per token)
        over which ``cond`` broadcasts: ``(..., B, L, d)``, ``(..., B, L)``, ``(B, L, D)``.
        ``groups_L`` says which rows form one patch: a joint head lets the tokens of a patch
        see each other (and only each other); a per-token head ignores it.
        """


# ----------------------------------------------------------------------------- solving
@dataclass(frozen=True)
class SolveResult:
    """The end point of an integration and the number of velocity evaluations it cost."""

    y1: Tensor
    nfe: int


VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (t scalar tensor, y) -> dy/dt


class ODESolver(Plugin, ABC):
    """Integrates ``dy/dt = v(t, y)`` from t=0 (noise) to t=1 (data). Constructor: ``(params)``.

    Subclasses implement :meth:`solve`. A solver whose work is fixed in advance (a fixed-step
    method) says so in :meth:`evaluations`: its solve issues the same kernels every call, so
    sampling may capture it as one CUDA graph (``sample.capture``) and its NFE needs no counting.
    """

    plugin_kind = "ode_solver"

    def evaluations(self) -> int | None:
        """Velocity evaluations of one solve when fixed in advance (fixed steps x stages); ``None``
        when the solver decides as it goes (adaptive step control, on the host: not capturable)."""
        return None

    def integrate(self, velocity: VelocityFn, y0: Tensor) -> SolveResult:
        """Solve from ``y0`` at t=0 to t=1 with the number of evaluations of ``velocity`` (NFE):
        :meth:`evaluations` when known, else counted as the solve runs."""
        known = self.evaluations()
        if known is not None:
            return SolveResult(y1=self.solve(velocity, y0), nfe=known)
        calls = 0

        def counted(t: Tensor, y: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            return velocity(t, y)

        y1 = self.solve(counted, y0)
        return SolveResult(y1=y1, nfe=calls)

    @abstractmethod
    def solve(self, velocity: VelocityFn, y0: Tensor) -> Tensor:
        """The state at t=1; ``velocity`` receives t as a 0-dim tensor. A solver with fixed
        :meth:`evaluations` must call ``velocity`` exactly that often and never read a device
        value on the host (its solve is replayed as a CUDA graph)."""


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class CoordinationPair:
    """Two adjacent modules' predictions on the tokens the coarser one generates.

    ``v_fine`` carries gradients into the finer module; ``v_coarse`` is detached. All tensors
    are ``(B', L, d)`` except ``t`` which is ``(B', L)`` and ``labels`` which is ``(B',)`` (the
    class of each row's image, the null class where label dropout hit). ``x1`` holds the data
    tokens the pair predicts, so an objective may compare data estimates
    (``method.flow.data_estimate``) with the data itself; ``step`` is the training step (``None``
    outside training), so an objective may change over training without core edits.
    """

    fine_stage: int
    v_fine: Tensor
    v_coarse: Tensor
    y_t: Tensor
    t: Tensor
    x1: Tensor | None = None
    labels: Tensor | None = None
    step: int | None = None


class CoordinationObjective(Plugin, ABC):
    """A loss aligning adjacent modules in training. Constructor: ``(params)``.
    ``needs_pairs = False`` lets the generator skip the coordination rows entirely."""

    plugin_kind = "coordination_objective"

    needs_pairs: ClassVar[bool] = True

    @abstractmethod
    def __call__(self, pairs: list[CoordinationPair]) -> Tensor:
        """The weighted coordination loss (a scalar)."""


# ----------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class TokenSample:
    """One batch of a generator's sampling: the tokens ``(B, n, d)`` and what they cost.

    ``nfe`` counts velocity evaluations and ``context_passes`` the sequential passes of the
    context network (a scale module's ``extend``/``forward``); a diffusion transformer, whose
    network *is* the velocity, has none. Every velocity evaluation is sequential too, so the
    critical path is ``context_passes + nfe`` network passes. ``nfe_per_module`` splits ``nfe``
    by stage (module); empty when a generator does not say.
    """

    tokens: Tensor
    nfe: int
    context_passes: int
    nfe_per_module: tuple[int, ...] = ()


@dataclass
class SampleStats:
    """What sampling cost: sequential steps, network passes, velocity evaluations, wall time."""

    num_images: int
    sequential_steps: int
    nfe_per_image: float  # velocity evaluations each image took part in (mean over batches)
    seconds: float
    context_passes: int = 0  # sequential context-network passes per batch (see TokenSample)
    nfe_per_module: list[float] = field(default_factory=list)  # nfe_per_image split by module
    captured: bool = False  # patch solves replayed as CUDA graphs (``sample.capture``), else eager

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(self.num_images, 1)

    @property
    def sequential_passes(self) -> float:
        """Network passes on the critical path of one image: context passes plus NFE."""
        return self.context_passes + self.nfe_per_image


@dataclass
class Samples:
    """Generated images in [-1, 1] with the labels they were conditioned on."""

    images: Tensor
    labels: Tensor
    stats: SampleStats


class SampleFn(Protocol):
    """The run's sampler: ``(labels, seed, batch_size=None) -> Samples`` with its EMA weights."""

    def __call__(self, labels: Tensor, seed: int = 0, batch_size: int | None = None) -> Samples: ...


@dataclass
class EvalContext:
    """What a metric may use: the dataset, the run's sampler, the model, a cache directory.
    :meth:`generated` samples ``samples_per_class`` images of every class once, shared by metrics."""

    dataset: Dataset
    sampler: SampleFn
    device: torch.device
    cache_dir: Path
    dataset_name: str = "dataset"
    model: nn.Module | None = None
    samples_per_class: int = 100
    seed: int = 0
    _generated: Samples | None = field(default=None, repr=False)

    def generated(self) -> Samples:
        """Class-balanced samples of the run (made on first use, then reused)."""
        if self._generated is None:
            labels = torch.arange(self.dataset.num_classes).repeat_interleave(self.samples_per_class)
            self._generated = self.sampler(labels, self.seed)
        return self._generated


class Metric(Plugin, ABC):
    """Numbers from a trained run. Constructor: ``(params)``."""

    plugin_kind = "metric"

    @abstractmethod
    def compute(self, ctx: EvalContext) -> dict[str, float]:
        """Metric values keyed by name (names carry their method, e.g. ``fid_inception``)."""

    def names(self, dataset_name: str) -> set[str] | None:
        """The keys ``compute`` returns on ``dataset_name`` (studies check objectives); None: unknown."""
        return None


# ----------------------------------------------------------------------------- run loggers
@dataclass(frozen=True)
class LogRun:
    """The run a logger opens; ``state``: what its last ``open`` returned (``{}`` at first)."""

    run_dir: Path
    name: str
    output_dir: Path
    hparams: dict[str, Any]  # the resolved config, flattened (``train.lr`` -> 1e-3)
    state: dict[str, Any]
    group: str | None = None  # a study's name: its trials log together


class RunLogger(Plugin, ABC):
    """Training curves where researchers watch them (TensorBoard, W&B, MLflow), beside
    ``train_log.jsonl``, the source of truth. Constructor: ``(params)``. Rank 0 alone calls, in
    order: ``open``, ``log_scalars``/``log_evaluation`` with steps that never go back, ``close``;
    a resume opens again with the state ``open`` returned and never resends a step. ``extra``:
    the optional install it needs (``pip install 'nestar-lab[EXTRA]'``)."""

    plugin_kind = "logger"
    extra: ClassVar[str | None] = None

    @classmethod
    def missing(cls) -> str | None:
        """The module this logger needs and cannot import, or None: checked before any work."""
        return None

    @abstractmethod
    def open(self, run: LogRun) -> dict[str, Any]:
        """Start the run, or continue it from ``run.state``; return the state to keep (JSON)."""

    @abstractmethod
    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """One training step's record: every loss part, the learning rate, skips, timing."""

    @abstractmethod
    def log_evaluation(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        """The evaluation's metrics and sample grid (a PNG file), at the trained step."""

    @abstractmethod
    def close(self) -> None:
        """Flush and finish (the run can be opened again to continue it)."""
