"""Run loggers (``loggers:``): the contract over every registered logger, and each built-in one
read back with its own tool (TensorBoard's event reader, the W&B offline run file, MLflow's
client) against ``train_log.jsonl``; a kill and resume logs each step once; a failing logger
ends the run with one line and leaves the checkpoint and log intact; a study groups its trials."""

from __future__ import annotations

import copy
import errno
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from nestar_lab.cli import main
from nestar_lab.config.errors import ConfigError
from nestar_lab.config.parts import make
from nestar_lab.config.registry import get_registry
from nestar_lab.config.schema import ComponentSpec
from nestar_lab.config.validation import validate_config
from nestar_lab.interfaces import LogRun, RunLogger
from nestar_lab.run.evaluate import evaluate
from nestar_lab.run.train import load_trained, train

ALL = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture(autouse=True)
def _quiet_offline(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")


def _raw(tmp_path: Path, loggers: list[str], **train) -> dict:
    raw = copy.deepcopy(TINY)
    raw["output_dir"] = str(tmp_path / "runs")
    raw["metrics"] = [{"name": "nearest_train_distance"}]
    raw["loggers"] = [{"name": n} for n in loggers]
    raw["train"] = {**raw["train"], **train}
    return raw


def _log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _expected(run: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as the JSONL says (the numbers loggers receive)."""
    out: dict[str, dict[int, float]] = {}
    for row in _log_rows(run):
        for key, value in row.items():
            if key != "step" and not isinstance(value, str):
                out.setdefault(f"train/{key}", {})[row["step"]] = math.nan if value is None else float(value)
    return out


def _same(got: dict[int, float], want: dict[int, float], rel=1e-6) -> bool:
    return got.keys() == want.keys() and all(math.isclose(got[s], want[s], rel_tol=rel, abs_tol=1e-9) for s in want)


# ----------------------------------------------------------------------------------- readers
def tensorboard_scalars(run: Path) -> dict[str, dict[int, list[float]]]:
    """tag -> step -> every value the event files hold (TensorBoard's own reader, purge honoured)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(run))
    mux.Reload()
    out: dict[str, dict[int, list[float]]] = {}
    for name in mux.Runs():
        for tag in mux.GetAccumulator(name).Tags()["scalars"]:
            for event in mux.Scalars(name, tag):
                out.setdefault(tag, {}).setdefault(event.step, []).append(event.value)
    return out


def wandb_history(run: Path) -> list[dict]:
    """The history rows of every offline W&B run file under ``run`` (a leveldb-style record log of
    protobuf ``Record``s: 32 KiB blocks, 7-byte headers, records split FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            buf += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def mlflow_metrics(run: Path) -> dict[str, dict[int, list[float]]]:
    from mlflow.tracking import MlflowClient

    state = json.loads((run / "loggers.json").read_text())
    entry = next(v["state"] for k, v in state.items() if k.endswith(":mlflow"))
    client = MlflowClient(entry["tracking_uri"])
    out: dict[str, dict[int, list[float]]] = {}
    for key in client.get_run(entry["run_id"]).data.metrics:
        for m in client.get_metric_history(entry["run_id"], key):
            out.setdefault(key, {}).setdefault(m.step, []).append(m.value)
    return out


def _once(series: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    """Each tag's values, asserting one value per step."""
    for tag, steps in series.items():
        twice = {s: v for s, v in steps.items() if len(v) != 1}
        assert not twice, f"{tag}: steps logged more than once: {twice}"
    return {tag: {s: v[0] for s, v in steps.items()} for tag, steps in series.items()}


# ----------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", sorted(get_registry().names("logger")))
def test_logger_contract(name, tmp_path):
    """Every registered logger: default params; open, log, close; open again from its state."""
    cls = get_registry().get("logger", name)
    assert issubclass(cls, RunLogger) and cls.missing() is None  # `make test` installs every extra
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "grid.png").write_bytes(_png())
    run = LogRun(run_dir=run_dir, name="run", output_dir=tmp_path, hparams={"train.lr": 1e-3, "k": 4, "x": None},
                 state={})  # fmt: skip
    logger = make("logger", ComponentSpec(name=name))
    state = logger.open(run)
    json.dumps(state)  # kept in loggers.json
    logger.log_scalars(1, {"total": 1.5, "lr": 1e-3})
    logger.log_scalars(2, {"total": math.nan, "lr": 1e-3})  # a skipped step's loss
    logger.close()
    again = make("logger", ComponentSpec(name=name))
    assert again.open(LogRun(run_dir=run_dir, name="run", output_dir=tmp_path, hparams={}, state=state)) is not None
    again.log_scalars(3, {"total": 1.0})
    again.log_evaluation(3, {"fid": 2.5}, run_dir / "grid.png")
    again.close()


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------- read back
@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    """One tiny run trained and evaluated with all three loggers."""
    tmp = tmp_path_factory.mktemp("logged")
    cfg = validate_config(_raw(tmp, ALL))
    run = Path(train(cfg, tmp / "runs" / "r", progress=False).run_dir)
    evaluate(load_trained(run), run)
    return run


def test_the_log_holds_every_record_a_logger_gets(logged_run):
    row = _log_rows(logged_run)[-1]
    for key in ("step", "lr", "total", "nonfinite_skipped", "step_seconds", "images_per_second"):
        assert key in row, row
    assert [r["step"] for r in _log_rows(logged_run)] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_events_match_the_log(logged_run):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    got = _once(tensorboard_scalars(logged_run))
    for tag, want in _expected(logged_run).items():
        assert _same(got[tag], want, rel=1e-6), tag  # float32 in the event file
    assert set(got["eval/nn_train_dist_generated"]) == {6}
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(logged_run))
    mux.Reload()
    tags = {t for r in mux.Runs() for t in mux.GetAccumulator(r).Tags()["images"]}
    assert "samples" in tags
    hparams = mux.PluginRunToTagToContent("hparams")
    assert hparams, "no HParams data"


def test_wandb_offline_run_matches_the_log(logged_run):
    rows = wandb_history(logged_run)
    series: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and isinstance(value, (int, float)):
                series.setdefault(key, {}).setdefault(row["_step"], []).append(float(value))
    got = _once(series)
    for tag, want in _expected(logged_run).items():
        assert _same(got[tag], want), tag
    assert set(got["eval/nn_train_dist_generated"]) == {6}
    image = next(row["samples/path"] for row in rows if row.get("samples/_type") == "image-file")
    assert list(logged_run.glob(f"wandb/offline-run-*/files/{image}"))  # the grid itself, for `wandb sync`
    state = json.loads((logged_run / "loggers.json").read_text())["1:wandb"]["state"]
    assert state["mode"] == "offline"  # nothing went to the network


def test_mlflow_store_matches_the_log(logged_run):
    from mlflow.tracking import MlflowClient

    got = _once(mlflow_metrics(logged_run))
    for tag, want in _expected(logged_run).items():
        assert _same(got[tag], want), tag
    state = json.loads((logged_run / "loggers.json").read_text())["2:mlflow"]["state"]
    run = MlflowClient(state["tracking_uri"]).get_run(state["run_id"])
    assert run.data.params["train.lr"] and run.data.params["generator"] == "nestar"
    assert run.info.status == "FINISHED"
    assert "eval/nn_train_dist_generated" in run.data.metrics


# ----------------------------------------------------------------------------------- resume
def test_a_kill_and_resume_logs_every_step_once(tmp_path):
    """A kill after step 6 was logged but before its checkpoint (the checkpoint of step 3 on
    disk, the loggers at step 6): the resume trains 4-6 again and sends none of them twice."""
    cfg = validate_config(_raw(tmp_path, ALL, steps=8, checkpoint_every=3))
    run = tmp_path / "runs" / "r"
    saved = {}

    def keep_step3(step, exp):
        if step == 4:  # the checkpoint of step 3 is on disk
            saved["ckpt"] = (run / "checkpoint.pt").read_bytes()
        if step == 6:
            raise KeyboardInterrupt  # as a kill would: no checkpoint of this step

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False, callbacks=[keep_step3])
    (run / "checkpoint.pt").write_bytes(saved["ckpt"])
    assert json.loads((run / "loggers.json").read_text())["0:tensorboard"]["last_step"] == 6
    train(cfg, run, resume=True, progress=False)
    timing = ("train/step_seconds", "train/images_per_second")  # measured, not recomputed: the first segment's
    want = {tag: v for tag, v in _expected(run).items() if tag not in timing}
    assert set(want["train/total"]) == set(range(1, 9))
    for got in (tensorboard_scalars(run), mlflow_metrics(run)):
        got = _once(got)
        for tag in want:
            assert _same(got[tag], want[tag], rel=1e-6), tag
    series: dict[str, dict[int, list[float]]] = {}
    for row in wandb_history(run):
        for key, value in row.items():
            if key.startswith("train/"):
                series.setdefault(key, {}).setdefault(row["_step"], []).append(float(value))
    assert _once(series)["train/total"].keys() == set(range(1, 9))
    mlflow_runs = {v["state"]["run_id"] for k, v in json.loads((run / "loggers.json").read_text()).items() if "mlflow" in k}
    assert len(mlflow_runs) == 1  # the same MLflow run continued


# ----------------------------------------------------------------------------------- failures
def test_a_failing_logger_is_one_line_and_keeps_checkpoint_and_log(tmp_path, monkeypatch, capsys):
    from nestar_plugins.loggers.tensorboard_logger import TensorBoardLogger

    real = TensorBoardLogger.log_scalars

    def disk_full(self, step, values):
        if step == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, values)

    monkeypatch.setattr(TensorBoardLogger, "log_scalars", disk_full)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path, ["tensorboard"], checkpoint_every=3)))
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: logger tensorboard (loggers.0) failed in log_scalars: ") and "No space left" in line
    assert [r["step"] for r in _log_rows(run)] == [1, 2, 3, 4, 5]  # the log was written before the logger
    assert load_trained(run) is not None  # the checkpoint of step 3 loads
    monkeypatch.setattr(TensorBoardLogger, "log_scalars", real)
    assert main(["train", "--resume", str(run)]) == 0  # and the run goes on


def test_a_logger_whose_package_is_missing_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from nestar_plugins.loggers.wandb_logger import WandbLogger

    monkeypatch.setattr(WandbLogger, "missing", classmethod(lambda cls: "wandb"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path, ["tensorboard", "wandb"])))
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "loggers.1: wandb needs the package 'wandb'" in line and "pip install 'nestar-lab[wandb]'" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, want", [
    ({"name": "neptune"}, "loggers.0.name: unknown logger 'neptune'; registered logger plugins: mlflow, tensorboard, wandb"),
    ({"name": "wandb", "params": {"mode": "sometimes"}}, "loggers.0.params.mode: got 'sometimes'; input should be"),
    ({"name": "tensorboard", "params": {"flush_seconds": -1}}, "loggers.0.params.flush_seconds: got -1"),
    ({"name": "mlflow", "params": {"tracking_uri": "foo://x"}}, "loggers.0.params.tracking_uri: got 'foo://x'; "),
])  # fmt: skip
def test_bad_logger_specs_are_config_errors(spec, want, tmp_path):
    raw = _raw(tmp_path, [])
    raw["loggers"] = [spec]
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert len(info.value.lines) == 1 and want in info.value.lines[0], info.value.lines


def test_only_rank_0_logs(tmp_path):
    from nestar_lab.run.loggers import RunLoggers

    cfg = validate_config(_raw(tmp_path, ALL))
    (tmp_path / "r").mkdir()
    with RunLoggers(cfg, tmp_path / "r", active=False) as loggers:  # what train() gives a rank > 0
        loggers.scalars(1, {"total": 1.0})
    assert list((tmp_path / "r").iterdir()) == []


# ----------------------------------------------------------------------------------- studies
def test_a_studys_trials_are_grouped_in_each_tool(tmp_path):
    from mlflow.tracking import MlflowClient

    from nestar_lab.sweep.study import load_study
    from nestar_lab.sweep.tuning import run_study

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(_raw(tmp_path, ["mlflow", "wandb", "tensorboard"])))
    (tmp_path / "grouped.yaml").write_text(yaml.safe_dump({
        "name": "grouped", "base": "base.yaml", "output_dir": str(tmp_path / "studies"),
        "space": {"generator.params.k": {"choices": [2, 4]}}, "sampler": {"name": "grid"},
        "objectives": [{"metric": "nn_train_dist_generated"}], "pruner": {"name": "none"},
    }))  # fmt: skip
    spec = load_study(tmp_path / "grouped.yaml")
    study = run_study(spec, trials=2)
    runs = [Path(t.user_attrs["run_dir"]) for t in study.trials]
    states = [json.loads((r / "loggers.json").read_text()) for r in runs]
    uri = states[0]["0:mlflow"]["state"]["tracking_uri"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("grouped")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 2 and {r.data.params["generator.k"] for r in found} == {"2", "4"}
    assert all(s["1:wandb"]["state"]["group"] == "grouped" for s in states)
    assert all(list(r.glob("events.out.tfevents.*")) for r in runs)  # `tensorboard --logdir <study>/trials`
    shutil.rmtree(tmp_path / "studies")
