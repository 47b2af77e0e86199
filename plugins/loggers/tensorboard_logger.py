"""TensorBoard: event files in the run directory, so ``tensorboard --logdir runs`` shows every
run (a study's trials under ``runs/studies/<study>/trials``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nestar_plugins.loggers.common import missing_module, scalar_hparams
from pydantic import Field

from nestar_lab.interfaces import LogRun, Params, RunLogger


class TensorBoardLogger(RunLogger):
    """Scalars as ``train/<key>`` and ``eval/<metric>``, the sample grid as the image
    ``samples``, and the resolved config in the HParams view with the evaluation's metrics (sort
    a study's trials by its objective there). Needs ``pip install 'nestar-lab[tensorboard]'``."""

    extra = "tensorboard"

    class Params(Params):
        flush_seconds: float = Field(30.0, gt=0, description="seconds between writes of the event file")

    @classmethod
    def missing(cls) -> str | None:
        return missing_module("tensorboard")

    def open(self, run: LogRun) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.writer = SummaryWriter(log_dir=str(run.run_dir), flush_secs=int(max(1, self.params.flush_seconds)))
        return {"log_dir": str(run.run_dir)}

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def log_evaluation(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        # the HParams view's row: this run's config and its metrics (written at ``step`` as eval/<metric>)
        self.writer.add_hparams(scalar_hparams(self.run.hparams), {f"eval/{k}": v for k, v in metrics.items()},
                                run_name=".", global_step=step)  # fmt: skip
        if grid is not None:
            import numpy as np
            from PIL import Image

            self.writer.add_image("samples", np.asarray(Image.open(grid).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
