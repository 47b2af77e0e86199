"""The config's run loggers (``loggers:``), fed by the training loop and the evaluation.

Rank 0 alone logs. ``train_log.jsonl`` stays the source of truth; the loggers receive the same
records. Each logger's state (its run id) and the last training step it received are kept in
``loggers.json`` in the run directory, so a resumed run continues the same logged run and never
sends a step twice: the steps a killed segment logged after its last checkpoint are trained
again on resume (with the same values: every draw of step s is seeded by the run seed and s) and
are not sent again. A logger that raises ends the run with one line naming it (exit 1); the
checkpoint and ``train_log.jsonl`` are written before any logger is called, so they stay intact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nestar_lab.config.errors import BadInput, RunFailed, one_line
from nestar_lab.config.parts import make
from nestar_lab.config.registry import get_registry
from nestar_lab.config.schema import ExperimentConfig
from nestar_lab.interfaces import LogRun, RunLogger
from nestar_lab.run.rundir import write_json

STATE = "loggers.json"


class LoggerFailed(RunFailed, RuntimeError):
    """A logger raised: one line naming it, the method and what to do. Exit 1."""


def check_loggers(cfg: ExperimentConfig) -> None:
    """Before any work: every logger the config names can import what it needs, else one
    :class:`BadInput` line naming the extra to install."""
    for i, spec in enumerate(cfg.loggers):
        cls = get_registry().get("logger", spec.name)
        module = cls.missing()
        if module is not None:
            extra = f"pip install 'nestar-lab[{cls.extra}]'" if cls.extra else f"install {module}"
            raise BadInput(f"loggers.{i}: {spec.name} needs the package {module!r}, which is not installed; "
                           f"{extra} (or remove it from loggers:)")  # fmt: skip


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a record (a bool as 0/1, a missing value as NaN), without ``step``."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, str):
            continue
        if value is None or isinstance(value, (bool, int, float)):
            out[key] = math.nan if value is None else float(value)
    return out


class RunLoggers:
    """The loggers of one run directory, opened on :meth:`open` (rank 0, ``active``)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, active: bool = True, group: str | None = None):
        self.cfg, self.run_dir, self.group = cfg, Path(run_dir), group
        self.active = active and bool(cfg.loggers)
        self.loggers: list[tuple[str, RunLogger]] = []
        self.book: dict[str, dict[str, Any]] = {}

    def open(self) -> RunLoggers:
        if not self.active or self.loggers:
            return self
        from nestar_lab.run.results import flatten_config

        self.book = self._read()  # the callers ran check_loggers before any work
        hparams = {k: v for k, v in flatten_config(self.cfg).items() if v is not None}
        for i, spec in enumerate(self.cfg.loggers):
            key = f"{i}:{spec.name}"
            entry = self.book.setdefault(key, {"state": {}, "last_step": 0})
            logger = make("logger", spec)
            run = LogRun(run_dir=self.run_dir, name=self.run_dir.name, output_dir=Path(self.cfg.output_dir),
                         hparams=hparams, state=dict(entry["state"]), group=self.group)  # fmt: skip
            try:
                entry["state"] = self._call(key, "open", logger.open, run) or {}
            except LoggerFailed:
                self.close(quiet=True)  # the ones already open
                raise
            self.loggers.append((key, logger))
        self._write()
        return self

    def scalars(self, step: int, row: dict[str, Any]) -> None:
        """A training step's record, to every logger that has not had this step yet."""
        values, sent = numbers(row), False
        for key, logger in self.loggers:
            entry = self.book[key]
            if step > int(entry["last_step"]):
                self._call(key, "log_scalars", logger.log_scalars, step, values)
                entry["last_step"], sent = step, True
        if sent:
            self._write()

    def evaluation(self, step: int, row: dict[str, Any], grid: Path | None) -> None:
        values = {k: v for k, v in numbers(row).items() if math.isfinite(v)}
        for key, logger in self.loggers:
            self._call(key, "log_evaluation", logger.log_evaluation, step, values, grid)

    def close(self, quiet: bool = False) -> None:
        """Finish every logger; ``quiet`` (another error is on its way) swallows their errors."""
        loggers, self.loggers = self.loggers, []
        for key, logger in loggers:
            try:
                self._call(key, "close", logger.close)
            except LoggerFailed:
                if not quiet:
                    raise

    def __enter__(self) -> RunLoggers:
        return self.open()

    def __exit__(self, kind, exc, tb) -> None:
        self.close(quiet=exc is not None)

    def _call(self, key: str, method: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # the tool's own error (disk full, a bad URI): one line naming the logger
            what = one_line(exc) or type(exc).__name__
            raise LoggerFailed(f"logger {key.split(':', 1)[1]} (loggers.{key.split(':')[0]}) failed in {method}: "
                               f"{what}; the checkpoint and train_log.jsonl in {self.run_dir} are untouched; fix it "
                               f"or remove it from loggers:, then resume") from exc  # fmt: skip

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            book = json.loads((self.run_dir / STATE).read_text())
        except (OSError, ValueError):
            return {}
        return book if isinstance(book, dict) else {}

    def _write(self) -> None:
        write_json(self.run_dir / STATE, self.book)
