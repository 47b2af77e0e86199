"""Weights & Biases, offline by default: the run is written under ``<run dir>/wandb`` and nothing
touches the network; ``wandb sync <run dir>/wandb/offline-run-*`` uploads it later."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

from nestar_plugins.loggers.common import missing_module, scalar_hparams
from pydantic import Field

from nestar_lab.interfaces import LogRun, Params, RunLogger


class WandbLogger(RunLogger):
    """Scalars as ``train/<key>`` and ``eval/<metric>`` (also in the run's summary), the sample
    grid as the image ``samples``, the resolved config as the run's config; a study's trials share
    a group named after it. A resumed run continues the same W&B run id. Needs
    ``pip install 'nestar-lab[wandb]'``."""

    extra = "wandb"

    class Params(Params):
        mode: Literal["offline", "online", "disabled"] = Field(
            "offline", description="offline (default): files only, `wandb sync` later; online needs a login"
        )
        project: str = Field("nestar-lab", min_length=1)
        entity: str | None = None
        tags: list[str] = Field(default_factory=list)

    @classmethod
    def missing(cls) -> str | None:
        return missing_module("wandb")

    def open(self, run: LogRun) -> dict[str, Any]:
        import wandb

        p = self.params
        run_id = run.state.get("id") or uuid.uuid4().hex[:12]  # W&B ids: lower-case letters and digits
        group = run.state.get("group", run.group)
        settings = wandb.Settings(silent=True, console="off")
        self.wb = wandb.init(id=run_id, resume="allow", mode=p.mode, project=p.project, entity=p.entity,
                             group=group, name=run.name, dir=str(run.run_dir), tags=p.tags or None,
                             reinit="create_new", settings=settings)  # fmt: skip
        self.wb.config.update(scalar_hparams(run.hparams), allow_val_change=True)  # a resume may change some
        return {"id": run_id, "group": group, "mode": p.mode}

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.wb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_evaluation(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        import wandb

        row: dict[str, Any] = {f"eval/{k}": v for k, v in metrics.items()}
        if grid is not None:
            row["samples"] = wandb.Image(str(grid))
        self.wb.log(row, step=step)
        self.wb.summary.update(row)

    def close(self) -> None:
        self.wb.finish()
