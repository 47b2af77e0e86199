"""Evaluation: run the configured metric plugins on a trained run -> one row of numbers."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nestar_lab.config.errors import BadInput
from nestar_lab.interfaces import EvalContext, Samples, SampleStats
from nestar_lab.method.sample import Sampler
from nestar_lab.run import distributed
from nestar_lab.run.experiment import Experiment, build_experiment, device_name, precision_name
from nestar_lab.run.loggers import RunLoggers, check_loggers
from nestar_lab.run.results import append_run
from nestar_lab.run.rundir import SUMMARY, write_json


def cache_root() -> Path:
    """Where derived artefacts (classifiers, reference statistics) are cached: ``$NESTAR_CACHE``
    or ``~/.cache/nestar_lab``."""
    return Path(os.environ.get("NESTAR_CACHE", Path.home() / ".cache" / "nestar_lab"))


def make_sampler(exp: Experiment) -> Sampler:
    """The run's sampler (its solvers and guidance, per module, and its precision)."""
    return Sampler(exp.generator, exp.tokenizer, exp.order, exp.sampling_plan())


def time_sampling(cfg, images: int = 50) -> tuple[float, int]:
    """Seconds per image of ``cfg``'s sampler on this machine, and the dataset's class count, for
    cost estimates: the second of two calls of ``images`` images, untrained weights (a fixed-step
    sampler costs the same whatever its weights; an adaptive solver's figure is a guess)."""
    exp = build_experiment(cfg)
    sampler = make_sampler(exp)
    labels = torch.arange(images) % exp.dataset.num_classes
    sampler(labels, 0)
    t0 = time.perf_counter()
    sampler(labels, 1)
    return (time.perf_counter() - t0) / images, exp.dataset.num_classes


def evaluate(exp: Experiment, run_dir: str | Path, record: bool = True) -> dict[str, Any]:
    """Sample class-balanced images, run every metric, save ``metrics.json`` and ``samples.png``,
    and (``record``) append the run's row to the results store.

    A metric that fails does not lose the others: its error is recorded as ``error_<name>``.
    With ``record``, the config's ``loggers`` receive the metrics and the grid at the trained step.
    Under torch.distributed the samples are drawn by every rank (its share of the labels) and
    gathered on rank 0, which alone runs the metrics and writes; other ranks return ``{}``.
    """
    run_dir = Path(run_dir)
    info = distributed.current()
    if record and info.is_main:
        check_loggers(exp.cfg)  # a logger's package missing: before sampling
    ctx = EvalContext(
        dataset=exp.dataset,
        sampler=make_sampler(exp),
        device=exp.device,
        cache_dir=cache_root(),
        dataset_name=exp.cfg.dataset.name,
        model=exp.generator,
        samples_per_class=exp.cfg.eval.samples_per_class,
        seed=exp.cfg.eval.seed,
    )
    if info.is_main:
        print(ctx.sampler.path, file=sys.stderr)  # captured or eager, and why
    if info.enabled:
        labels = torch.arange(exp.dataset.num_classes).repeat_interleave(ctx.samples_per_class)
        ctx._generated = sample_sharded(ctx.sampler, labels, ctx.seed, exp.device, info)
        if not info.is_main:
            return {}
    row: dict[str, Any] = {}
    for spec, metric in zip(exp.cfg.metrics, exp.metrics):
        try:
            row.update(metric.compute(ctx))
        except Exception as exc:  # a failed metric is recorded, never fatal to the row
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            key = f"error_{spec.name}"
            row[key if key not in row else f"{key}_{len(row)}"] = message
            print(f"metric {spec.name} failed: {message}", file=sys.stderr)
    samples = ctx.generated()
    st = samples.stats
    row.setdefault("sequential_steps", st.sequential_steps)
    row.setdefault("nfe_per_image", st.nfe_per_image)
    for i, nfe in enumerate(st.nfe_per_module):
        row.setdefault(f"nfe_module_{i + 1}", nfe)
    row.update(eval_num_samples=st.num_images, eval_sample_seconds=st.seconds, sample_captured=int(st.captured),
               sample_precision=precision_name(exp.device, exp.cfg.train.precision), **trained_on(run_dir))
    save_grid(samples, run_dir / "samples.png")
    write_json(run_dir / "metrics.json", {"evaluated": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": row})
    if record:
        append_run(exp.cfg, run_dir, row, device=device_name(exp.device))
        with RunLoggers(exp.cfg, run_dir) as loggers:
            loggers.evaluation(trained_steps(run_dir, exp.cfg.train.steps), row, run_dir / "samples.png")
    return row


#: the numbers every evaluation's row holds whatever its metrics (``nfe_module_<i>`` per module
#: too; beside them the provenance columns, ``results.PROVENANCE_COLUMNS``, which are no metrics)
ROW_KEYS = frozenset({"sequential_steps", "nfe_per_image", "eval_num_samples", "eval_sample_seconds",
                      "sample_captured"})  # fmt: skip
PER_MODULE_KEY = re.compile(r"nfe_module_[1-9][0-9]*")


def row_names(cfg) -> set[str] | None:
    """Every key :func:`evaluate` will write for ``cfg`` (its metrics' :meth:`Metric.names` and
    :data:`ROW_KEYS`), known before any work; ``None`` when a metric cannot say until computed."""
    from nestar_lab.config.parts import make

    names = set(ROW_KEYS)
    for spec in cfg.metrics:
        given = make("metric", spec).names(cfg.dataset.name)
        if given is None:
            return None
        names |= set(given)
    return names


def unknown_metrics(cfg, wanted: list[str]) -> tuple[list[str], set[str]]:
    """The names in ``wanted`` that no evaluation of ``cfg`` will hold, and the names it will
    (both empty where a metric cannot say before computing)."""
    names = row_names(cfg)
    if names is None:
        return [], set()
    return [w for w in wanted if w not in names and not PER_MODULE_KEY.fullmatch(w)], names


def trained_steps(run_dir: Path, default: int) -> int:
    """The steps the run trained (its summary), or ``default`` where it has none."""
    try:
        return int(json.loads((run_dir / SUMMARY).read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def trained_on(run_dir: Path) -> dict[str, str]:
    """``train_hardware`` and ``train_precision`` of the run's training segments (``a+b`` where
    segments differed; nothing for a run whose summary predates them): whether two runs of a
    comparison trained alike, whatever machine evaluates them."""
    try:
        segments = json.loads((run_dir / SUMMARY).read_text()).get("segment_history") or []
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for key in ("hardware", "precision"):
        seen = list(dict.fromkeys(str(s[key]) for s in segments if isinstance(s, dict) and s.get(key)))
        if seen:
            out[f"train_{key}"] = "+".join(seen)
    return out


def sample_sharded(sampler, labels: torch.Tensor, seed: int, device, info) -> Samples:
    """Every rank samples ``labels[rank::world]`` (seed + rank); the images are gathered in label
    order on every rank. Seconds are the slowest rank's."""
    mine = sampler(labels[info.rank :: info.world], seed + info.rank)
    images = distributed.gather_cat(mine.images.to(device), info).cpu()
    got = distributed.gather_cat(mine.labels.to(device), info).cpu()
    order = torch.cat([torch.arange(len(labels))[r :: info.world] for r in range(info.world)])
    images_in_order = torch.empty_like(images)
    images_in_order[order] = images
    labels_in_order = torch.empty_like(got)
    labels_in_order[order] = got
    seconds = torch.tensor([mine.stats.seconds], device=device)
    torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    stats = SampleStats(len(labels), mine.stats.sequential_steps, mine.stats.nfe_per_image, float(seconds.item()),
                        mine.stats.context_passes, mine.stats.nfe_per_module)  # fmt: skip
    return Samples(images=images_in_order, labels=labels_in_order, stats=stats)


def image_path(text: str | None, default: Path) -> Path:
    """``--out`` of ``nestar sample``: an image file whose extension PIL writes (its directories
    are made as needed), or a one-line :class:`BadInput` before any work."""
    from PIL import Image

    out = Path(text) if text else default
    known = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if out.is_dir() or text and text.endswith(("/", os.sep)):
        raise BadInput(f"--out {out}: a directory; name the image file, e.g. {out / 'grid.png'}")
    if out.suffix.lower() not in known:
        raise BadInput(f"--out {out}: unknown image extension {out.suffix or '(none)'!r}; use .png, .jpg, .webp "
                       f"or another PIL writes")  # fmt: skip
    return out


def save_grid(samples: Samples, path: str | Path, per_class: int = 10, scale: int = 4) -> None:
    """A PNG grid with one row per class (up to ``per_class`` images each), upscaled ``scale``x."""
    from PIL import Image
    from torchvision.utils import make_grid

    rows = []
    classes = samples.labels.unique().tolist()
    for c in classes:
        imgs = samples.images[samples.labels == c][:per_class]
        pad = per_class - imgs.shape[0]
        if pad > 0:
            imgs = torch.cat([imgs, -torch.ones(pad, *imgs.shape[1:])])
        rows.append(imgs)
    grid = torch.cat(rows)
    grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="nearest")
    img = make_grid((grid + 1) / 2, nrow=per_class, padding=2, pad_value=0.5).clamp(0, 1)
    arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)
