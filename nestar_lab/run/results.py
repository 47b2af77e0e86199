"""The results store: one row per evaluated run, loaded as a pandas DataFrame.

Rows live in ``<output_dir>/results.csv`` (the config's ``output_dir``, ``runs`` by default):
run id, time, config hash, every config knob flattened to a column (``generator`` holds the
plugin name, ``generator.k`` its param; ``modules.1.scale_module.depth`` a module's own
setting), every metric, the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from nestar_lab.config.errors import BadInput
from nestar_lab.config.schema import COMPONENT_KINDS, ExperimentConfig

RESULTS_FILE = "results.csv"
ID_COLUMNS = ("run_id", "time", "config_hash", "device", "hardware", "run_dir")
#: where and how a row's run was trained and sampled (``evaluate``): not metrics, but what says
#: whether two rows are comparable (bf16 on one machine, fp32 on another)
PROVENANCE_COLUMNS = ("sample_precision", "train_hardware", "train_precision")


def results_path(output_dir: str | Path | None = None) -> Path:
    """``<output_dir>/results.csv``; ``output_dir`` defaults to ``$NESTAR_RESULTS`` or ``runs``."""
    return Path(output_dir or os.environ.get("NESTAR_RESULTS", "runs")) / RESULTS_FILE


def flatten_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Config knobs as flat columns: ``generator`` = plugin name, ``generator.k`` = a param."""
    data = cfg.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in COMPONENT_KINDS:
            flat[key] = value["name"]
            flat.update({f"{key}.{k}": _scalar(v) for k, v in value["params"].items()})
        elif key in ("metrics", "loggers"):
            flat[key] = ",".join(m["name"] for m in value)
        elif key == "modules":  # modules.1.scale_module.depth, modules.3.ode_solver(.steps), modules.2.cfg_scale
            flat.update(_module_columns(value))
        elif isinstance(value, dict):
            flat.update({f"{key}.{k}": _scalar(v) for k, v in value.items()})
        else:
            flat[key] = _scalar(value)
    return flat


def column_of(key: str) -> str:
    """The results column a config override key lands in (``flatten_config``'s naming): a plugin's
    params lose their ``params`` level, ``generator.params.k`` -> ``generator.k``."""
    return key.replace(".params.", ".")


def _module_columns(modules: dict[str, Any]) -> dict[str, Any]:
    """The ``modules:`` entries as columns, in the shared parts' style: a changed plugin name as
    ``modules.N.part``, a param as ``modules.N.part.param``, guidance as ``modules.N.cfg_scale``."""
    flat: dict[str, Any] = {}
    for number, entry in modules.items():
        for part, change in entry.items():
            if isinstance(change, dict):
                if change.get("name") is not None:
                    flat[f"modules.{number}.{part}"] = change["name"]
                flat.update({f"modules.{number}.{part}.{k}": _scalar(v) for k, v in change["params"].items()})
            elif change is not None:
                flat[f"modules.{number}.{part}"] = _scalar(change)
    return flat


def _scalar(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def config_hash(cfg: ExperimentConfig) -> str:
    """A short hash of the resolved config, the same for two runs of one experiment (where the
    curves are watched, ``loggers``, changes no result and is left out)."""
    data = cfg.model_dump(mode="json", exclude={"loggers"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def append_run(cfg: ExperimentConfig, run_dir: str | Path, metrics: dict[str, Any], device: str) -> Path:
    """Add one row for an evaluated run to its results store (written atomically). ``device``:
    the name of the device that evaluated it (column ``hardware``; ``device`` is the config's)."""
    run_dir = Path(run_dir)
    row = {
        "run_id": run_dir.name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config_hash": config_hash(cfg),
        **flatten_config(cfg),
        "hardware": device,
        "run_dir": str(run_dir),
        **metrics,
    }
    path = results_path(cfg.output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):  # study workers append concurrently
        frame = pd.DataFrame([row])
        try:
            old = load(cfg.output_dir)
        except BadInput as exc:  # keep the unreadable file aside, and this run's row in a new one
            aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            path.replace(aside)
            print(f"warning: {exc}; moved it to {aside}", file=sys.stderr)
            old = frame.iloc[0:0]
        if len(old):
            frame = pd.concat([old, frame], ignore_index=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(path)
    return path


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive advisory lock (``flock``) held for the block; a no-op where fcntl is absent."""
    try:
        import fcntl
    except ImportError:  # not POSIX: appends from concurrent processes are not serialised
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load(output_dir: str | Path | None = None) -> pd.DataFrame:
    """Every recorded run as a DataFrame (empty when nothing has been evaluated yet)."""
    path = results_path(output_dir)
    if not path.is_file():
        return pd.DataFrame(columns=list(ID_COLUMNS))
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{path}: not a results table nestar can read ({reason}); restore it or move it aside "
                       f"(runs add their rows to a new one)") from None  # fmt: skip


def resolve_column(df: pd.DataFrame, name: str) -> str:
    """A column by exact name or unique dotted suffix (``k`` -> ``generator.k``)."""
    if name in df.columns:
        return name
    matches = [c for c in df.columns if c.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise KeyError(f"no column {name!r} in the results; columns: {', '.join(map(str, df.columns))}")
    raise KeyError(f"column {name!r} is ambiguous: {', '.join(matches)}")


def select(df: pd.DataFrame, where: list[str] | None = None) -> pd.DataFrame:
    """Rows matching every ``column=value`` filter (values compared as text)."""
    for cond in where or []:
        if "=" not in cond:
            raise ValueError(f"--where {cond!r}: expected COLUMN=VALUE, e.g. k=4")
        key, value = cond.split("=", 1)
        col = resolve_column(df, key.strip())
        df = df[df[col].astype(str).isin({value.strip(), _normalise(value.strip())})]
    return df


def _normalise(value: str) -> str:
    try:
        return str(float(value))
    except ValueError:
        return value


def table(
    df: pd.DataFrame, where: list[str] | None = None, by: list[str] | None = None, metrics: list[str] | None = None
) -> pd.DataFrame:
    """Filter, then either one row per run or (with ``by``) the mean of each metric per group."""
    df = select(df, where)
    metric_cols = [resolve_column(df, m) for m in metrics] if metrics else metric_columns(df)
    if not by:
        return df[["run_id", *metric_cols]].reset_index(drop=True)
    by_cols = [resolve_column(df, b) for b in by]
    grouped = df.groupby(by_cols, dropna=False)
    out = grouped[metric_cols].mean(numeric_only=True)
    out.insert(0, "runs", grouped.size())
    return out.reset_index()


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Columns that are neither identifiers nor config knobs (every field of the config, flattened
    by :func:`flatten_config`: ``train.lr``, ``data.hflip``, ``modules.1.scale_module.depth``): the metrics."""
    fields = tuple(ExperimentConfig.model_fields)
    knobs = {*ID_COLUMNS, *PROVENANCE_COLUMNS, *fields}
    prefixes = tuple(f"{k}." for k in fields)
    return [c for c in df.columns if c not in knobs and not str(c).startswith(prefixes)]


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """A GitHub markdown table (no extra dependency)."""
    def cell(v):
        return floatfmt.format(v) if isinstance(v, float) else str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])
