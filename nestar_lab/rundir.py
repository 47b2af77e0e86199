"""A run directory: its resolved config, provenance, checkpoints (written atomically)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from nestar_lab.config import ConfigError, ExperimentConfig, dump_config, load_config
from nestar_lab.config import COMPONENT_KINDS
from nestar_lab.registry import get_registry

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"


def new_run_dir(cfg: ExperimentConfig, run_dir: str | Path | None = None) -> Path:
    """Create ``output_dir/name-YYYYmmdd-HHMMSS`` (or ``run_dir``) and write the resolved config."""
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{suffix}"
            suffix += 1
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / CONFIG)
    write_json(run_dir / "provenance.json", provenance(cfg))
    return run_dir


def provenance(cfg: ExperimentConfig) -> dict[str, Any]:
    """Who provided each part (distribution and version) and the software it ran on."""
    reg = get_registry()
    plugins = {field: reg.info(kind, getattr(cfg, field).name).provider for field, kind in COMPONENT_KINDS.items()}
    plugins["metrics"] = [reg.info("metric", m.name).provider for m in cfg.metrics]
    return {
        "plugins": plugins,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The resolved config of an existing run, validated again."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError([f"{run_dir}: not a run directory (no {CONFIG}); create one with `nestar train CONFIG`"])
    return load_config(path)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False).encode())


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` through a temporary file and a rename: never half a file."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | Path, map_location="cpu") -> dict[str, Any]:
    """The last checkpoint of a run (tensors and plain values only: ``weights_only=True``)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint; the run has not saved one yet (train it first)")
    return torch.load(path, map_location=map_location, weights_only=True)
