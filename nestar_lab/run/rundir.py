"""A run directory: its resolved config, provenance, checkpoints (written atomically).

Failures a user can meet here are one-line errors: :class:`RunDirError` (the place cannot hold
a new run: it already holds one, cannot be written, or another process is training in it) and
:class:`CheckpointError` (a checkpoint that cannot be read, is incomplete, holds non-finite weights or does not fit the
config), both :class:`~nestar_lab.config.errors.BadInput` (exit code 2 on the command line). A failed checkpoint write
removes its temporary file and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch

from nestar_lab.config.errors import BadInput, ConfigError
from nestar_lab.config.registry import get_registry
from nestar_lab.config.schema import COMPONENT_KINDS, ExperimentConfig
from nestar_lab.config.validation import load_config

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
SUMMARY = "train_summary.json"
RESUMES = "resumes.jsonl"
LOCK = ".training.lock"  # held (flock) while a process trains here; removed when it stops
#: files that mark a directory as holding a run
RUN_MARKERS = (CHECKPOINT, LOG, CONFIG)
#: what ``--overwrite`` removes: the files training and evaluation write (nothing else)
RUN_FILES = (CHECKPOINT, LOG, CONFIG, SUMMARY, RESUMES, "provenance.json", "metrics.json", "samples.png",
             "grid.png", "trained_in.txt", "loggers.json")  # fmt: skip
#: what the run loggers write there (TensorBoard's event files, W&B's offline runs), also removed
LOGGER_OUTPUTS = ("events.out.tfevents.*", "wandb")
CHECKPOINT_KEYS = ("step", "model", "optimizer", "ema")


class RunDirError(BadInput, ValueError):
    """A run directory cannot be used: it holds a run already, or cannot be written (exit 2)."""


class CheckpointError(BadInput, ValueError):
    """A checkpoint is unreadable, incomplete, non-finite, or does not fit the config (exit 2)."""


@contextlib.contextmanager
def training_lock(run_dir: str | Path):
    """Held while a process trains in ``run_dir``: a second process that would train in the same
    directory (the same command started twice, a study trial retried while its first process
    still runs) is refused with one :class:`RunDirError` line, before it changes any file, instead
    of both writing the one checkpoint and log. An advisory ``flock`` on ``run_dir/.training.lock``
    (naming its holder), released however the process ends; a no-op where fcntl is absent."""
    try:
        import fcntl
    except ImportError:  # not POSIX: nothing stops a second process
        yield
        return
    path = Path(run_dir) / LOCK
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process"
        handle.close()
        raise RunDirError(f"{run_dir}: {holder} is training in it; wait for it to finish (or stop it), then "
                          f"resume") from None  # fmt: skip
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: the directory is left as training found it
        handle.close()


def new_run_dir(cfg: ExperimentConfig, run_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Create ``output_dir/name-YYYYmmdd-HHMMSS`` (or ``run_dir``) and write the resolved config.

    A ``run_dir`` that already holds a run is refused (:class:`RunDirError`) unless
    ``overwrite``, which first removes that run's files; the directory must be writable.
    """
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{suffix}"
            suffix += 1
    run_dir = Path(run_dir)
    if not overwrite:
        refuse_held(run_dir)
    check_writable(run_dir)
    if overwrite:
        clear_run(run_dir)
    write_text(run_dir / CONFIG, _config_yaml(cfg))
    write_json(run_dir / "provenance.json", provenance(cfg))
    return run_dir


def refuse_held(run_dir: str | Path) -> None:
    """:class:`RunDirError` when ``run_dir`` holds a run, saying what to do: resume it when it
    has a checkpoint; otherwise (it failed or was stopped before its first) start it again."""
    held = holds_run(run_dir)
    if not held:
        return
    if CHECKPOINT not in held:
        raise RunDirError(
            f"{run_dir}: holds a run that never saved a checkpoint ({', '.join(held)}), so there is nothing to "
            f"resume; start it again with --overwrite, or choose another --run-dir"
        )
    raise RunDirError(
        f"{run_dir}: already holds a run ({', '.join(held)}); continue it with `nestar train --resume {run_dir}`, "
        "replace it with --overwrite, or choose another --run-dir"
    )


def holds_run(run_dir: str | Path) -> list[str]:
    """The run files (checkpoint, log, config) that ``run_dir`` holds; empty when none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return [name for name in RUN_MARKERS if (run_dir / name).exists()]


def clear_run(run_dir: str | Path) -> None:
    """Remove the files of a run (and stale ``*.tmp`` files) from ``run_dir``; keep anything else."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        for path in (run_dir / name, run_dir / f"{name}.tmp"):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                reason = os_reason(exc)
                raise RunDirError(f"{path}: cannot remove the old run's file ({reason}); remove it by hand") from None
    for pattern in LOGGER_OUTPUTS:
        for path in run_dir.glob(pattern):
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError as exc:
                reason = os_reason(exc)
                raise RunDirError(f"{path}: cannot remove the old run's logs ({reason}); remove it by hand") from None


def check_writable(run_dir: str | Path, option: str = "--run-dir") -> Path:
    """Create ``run_dir`` and write and remove a probe file in it, or raise a one-line
    :class:`RunDirError` naming the path (and ``option``, what sets it): checked before any work."""
    run_dir = Path(run_dir)
    probe = run_dir / f".nestar-write-probe-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise RunDirError(f"{run_dir}: exists and is not a directory; choose another {option}") from None
    except NotADirectoryError:
        raise RunDirError(
            f"{run_dir}: a part of this path is a file, not a directory; choose another {option}"
        ) from None
    except OSError as exc:
        raise RunDirError(
            f"{run_dir}: cannot write there ({os_reason(exc)}); "
            f"fix its permissions or choose another {option}"
        ) from None
    return run_dir


def os_reason(exc: OSError) -> str:
    """``No space left on device``, ``Permission denied``, ...: the OS's words for an error."""
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


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


def write_run_config(run_dir: str | Path, cfg: ExperimentConfig) -> None:
    """Replace a run's ``config.yaml`` (atomically)."""
    write_text(Path(run_dir) / CONFIG, _config_yaml(cfg))


def _config_yaml(cfg: ExperimentConfig) -> str:
    """What :func:`nestar_lab.config.validation.dump_config` writes (reloadable with ``load_config``)."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False).encode())


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Write through ``PATH.tmp`` and a rename; on failure the temporary file is removed and
    ``path`` keeps its old content."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` through a temporary file and a rename: never half a file.

    On failure (e.g. ``OSError`` ENOSPC) the temporary file is removed, the previous
    checkpoint is left intact and the error is raised again.
    """
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(run_dir: str | Path, map_location="cpu") -> dict[str, Any]:
    """The last checkpoint of a run (tensors and plain values only: ``weights_only=True``).

    An unreadable, incomplete or non-finite checkpoint is a one-line :class:`CheckpointError`
    naming the file and what to do.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no checkpoint; the run has not saved one yet (start it again with "
            f"`nestar train CONFIG --run-dir {run_dir} --overwrite`)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (PermissionError, IsADirectoryError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({os_reason(exc)})") from None
    except Exception as exc:  # truncated, garbled, not a torch file, pickled code: all unreadable
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        _corrupt(path, f"unreadable: {first}")
    _check_checkpoint(path, state)
    return state


def _corrupt(path: Path, why: str):
    raise CheckpointError(
        f"{path}: corrupt checkpoint ({why}); restore a good copy, or start the run over with "
        f"`nestar train CONFIG --run-dir {path.parent} --overwrite`"
    )


def _check_checkpoint(path: Path, state: Any) -> None:
    if not isinstance(state, dict):
        _corrupt(path, f"holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        _corrupt(path, f"missing {', '.join(missing)}")
    step = state["step"]
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        _corrupt(path, f"step is {step!r}")
    for key in ("model", "ema"):
        if not isinstance(state[key], dict) or not all(isinstance(v, torch.Tensor) for v in state[key].values()):
            _corrupt(path, f"{key} is not a mapping of tensors")
    opt = state["optimizer"]
    if not isinstance(opt, dict) or "state" not in opt or "param_groups" not in opt:
        _corrupt(path, "optimizer state is incomplete")
    for key in ("model", "ema"):
        for name, value in state[key].items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                _corrupt(path, f"{key} weight {name} is not finite")


def check_checkpoint_fits(
    state: dict[str, Any], expected: dict[str, torch.Tensor], run_dir: str | Path, changed: list[str] = (),
    advice: str = "resume with the run's own model settings (drop the --set that changes them) or start a new run",
) -> None:
    """Raise a one-line :class:`CheckpointError` naming the first parameter whose shape (or
    presence) differs between the checkpoint's ``model`` and ``expected`` (a state dict), how
    many more differ, and ``changed``: the config keys (``key old -> new``) that likely did it."""
    path = Path(run_dir) / CHECKPOINT
    saved = state["model"]
    problems = []
    for name, value in expected.items():
        if name not in saved:
            problems.append(f"parameter {name} is not in the checkpoint but the config has it")
        elif tuple(saved[name].shape) != tuple(value.shape):
            problems.append(f"parameter {name} has shape {list(saved[name].shape)} in the checkpoint but "
                            f"{list(value.shape)} under the config")  # fmt: skip
    problems += [f"parameter {name} is in the checkpoint but not under the config" for name in saved if name not in expected]
    if not problems:
        return
    more = f" (and {len(problems) - 1} more differ)" if len(problems) > 1 else ""
    cause = f"; changed from the run's config: {', '.join(changed[:4])}" if changed else ""
    raise CheckpointError(f"{path}: {problems[0]}{more}{cause}; {advice}")


