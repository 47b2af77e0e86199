"""MLflow: a local SQLite tracking store by default (``<output_dir>/mlflow.db``, artifacts in
``<output_dir>/mlartifacts``), or any tracking URI given; ``mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db`` shows the runs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from nestar_plugins.loggers.common import missing_module, scalar_hparams
from pydantic import Field, field_validator

from nestar_lab.interfaces import LogRun, Params, RunLogger

_BATCH = 100  # MLflow takes at most this many params per call
SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks")


class MlflowLogger(RunLogger):
    """Metrics ``train/<key>`` and ``eval/<metric>`` with their steps, the resolved config as
    params, the sample grid as an artifact; a run goes into the experiment ``experiment``, a
    study's trials into one named after the study. A resumed run continues the same MLflow run.
    Needs ``pip install 'nestar-lab[mlflow]'``."""

    extra = "mlflow"

    class Params(Params):
        tracking_uri: str | None = Field(None, description="default: sqlite:///<output_dir>/mlflow.db")
        experiment: str = Field("nestar-lab", min_length=1, description="a study logs into one named after it")

        @field_validator("tracking_uri")
        @classmethod
        def _known_scheme(cls, uri: str | None) -> str | None:
            """A URI MLflow can open: checked with the config, before any work."""
            if uri is None:
                return uri
            scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
            if scheme not in SCHEMES:
                raise ValueError(f"expected a tracking URI with one of the schemes {', '.join(SCHEMES)} "
                                 f"(e.g. sqlite:///runs/mlflow.db or http://host:5000)")  # fmt: skip
            return uri

    @classmethod
    def missing(cls) -> str | None:
        return missing_module("mlflow")

    def open(self, run: LogRun) -> dict[str, Any]:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # table creation and migrations talk at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        local = f"sqlite:///{(run.output_dir / 'mlflow.db').resolve()}"
        uri = run.state.get("tracking_uri") or self.params.tracking_uri or local
        if uri == local:
            run.output_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(uri)
        self.run_id = run.state.get("run_id")
        if self.run_id:  # a resumed run, or its evaluation: the same MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = run.group or self.params.experiment
            found = self.client.get_experiment_by_name(name)
            artifacts = (run.output_dir / "mlartifacts").resolve().as_uri() if uri == local else None
            exp_id = found.experiment_id if found else self.client.create_experiment(name, artifact_location=artifacts)
            tags = {"nestar.run_dir": str(run.run_dir)} | ({"nestar.study": run.group} if run.group else {})
            self.run_id = self.client.create_run(exp_id, run_name=run.name, tags=tags).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in scalar_hparams(run.hparams).items()]
            for i in range(0, len(params), _BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + _BATCH])
        return {"tracking_uri": uri, "run_id": self.run_id}

    def _metrics(self, step: int, values: dict[str, float], prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}/{k}", float(v), now, step) for k, v in values.items()])

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self._metrics(step, values, "train")

    def log_evaluation(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        self._metrics(step, metrics, "eval")
        if grid is not None:
            self.client.log_artifact(self.run_id, str(grid))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
