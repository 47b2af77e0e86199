"""SIGKILL at random moments, resume, and end with the weights of a run that never stopped.

Resume is designed to be exact (every random draw of step ``s`` is seeded by ``(seed, s)``,
the data order by ``(seed, epoch)``), so a run killed with SIGKILL -- no handler, no last
checkpoint -- and resumed from whatever checkpoint it left, as often as it is killed, must end
with a checkpoint whose model, EMA and optimiser state equal an uninterrupted run's bit for bit,
a log with each step once (and the same values), and no temporary files left behind.

Each training segment is a real ``python -m nestar_lab.cli train`` process in its own session,
killed (with everything it started) by a seeded :class:`random.Random` schedule: the kill is
timed by polling ``train_log.jsonl`` for a random step, then waiting a random fraction of a
step, so it lands anywhere in a step, a log append or a checkpoint write. One test pauses a
checkpoint write between its complete ``checkpoint.pt.tmp`` and the rename (a
``sitecustomize`` hook on ``PYTHONPATH``) and kills it there. The same random kills run under
2-process gloo DDP (``--distributed 2``), where torchrun and both ranks are killed at once.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import TINY

from nestar_lab.run.rundir import load_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="kills process trees found through /proc"),
]

STEPS, EVERY = 12, 3  # checkpoints at 3, 6, 9, 12: most kills land between two of them
DDP_STEPS, DDP_EVERY = 6, 2  # a DDP launch costs ~45 s of start-up on a loaded 2-core machine: one kill
SEGMENT_TIMEOUT = 240  # seconds for one training process, start-up included, on a loaded machine
STEP_WAIT = 0.15  # the longest random wait after a step's log line before the kill (see _step_wait)

HOOK = '''
import os, time
from pathlib import Path

_pause_at = int(os.environ.get("KILL_TEST_PAUSE_AT_CHECKPOINT", "0"))
if _pause_at:
    _real_replace, _seen = os.replace, [0]

    def _replace(src, dst, *args, **kwargs):
        if str(src).endswith("checkpoint.pt.tmp"):
            _seen[0] += 1
            if _seen[0] == _pause_at:  # the .tmp is complete; hold the rename until killed
                Path(os.environ["KILL_TEST_MARKER"]).write_text(str(src))
                time.sleep(3600)
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace
'''


# ---------------------------------------------------------------- helpers


def _config(path: Path, steps: int, every: int) -> Path:
    raw = copy.deepcopy(TINY)
    raw["output_dir"] = str(path.parent / "runs")
    raw["train"].update(steps=steps, checkpoint_every=every, batch_size=16, log_every=1)
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NESTAR_CACHE": str(cache)}
    env.pop("PYTHONPATH", None)
    return env | extra


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nestar_lab.cli", "train", *map(str, args)]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115  (closed by the child's exit; kept for the messages)
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, its process group and every process it started (and their groups):
    only what this test spawned."""
    pids = [proc.pid, *_descendants(proc.pid)]
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for pid in pids:  # the ranks first-and-all-at-once as far as the OS lets us
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=30)


def _logged_steps(run: Path) -> int:
    try:
        return (run / "train_log.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no output)"


def _segment(cmd, env, log: Path, run: Path, kill_after: int | None, wait: float) -> tuple[int, int | None]:
    """Run one training process; with ``kill_after``, SIGKILL it (tree and all) ``wait`` seconds
    after the log holds that many steps. Returns (exit code, logged steps when killed)."""
    proc = _start(cmd, env, log)
    try:
        deadline = time.monotonic() + SEGMENT_TIMEOUT
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"training did not finish in {SEGMENT_TIMEOUT}s:\n{_tail(log)}"
            if kill_after is not None and _logged_steps(run) >= kill_after and (run / "checkpoint.pt").exists():
                time.sleep(wait)
                if proc.poll() is not None:
                    break
                at = _logged_steps(run)
                _kill_tree(proc)
                return proc.returncode, at
            time.sleep(0.01)
        return proc.returncode, None
    finally:
        if proc.poll() is None:
            _kill_tree(proc)


def _train_with_kills(rng: random.Random, run: Path, config: Path, steps: int, every: int, env, log: Path,
                      extra: tuple[str, ...] = (), kills: int = 2, timed: Path | None = None) -> list[str]:  # fmt: skip
    """Train ``config`` in ``run``, SIGKILLing it ``kills`` times at random moments after its
    first checkpoint, resuming after each, until it finishes (each kill waits a random part of a
    step of the run ``timed``, see :func:`_step_wait`). Returns what happened, for messages."""
    history: list[str] = []
    cmd = _train_cmd(config, "--run-dir", run, *extra)
    progress = every  # a kill is drawn after a step past the first checkpoint, later than the last kill
    for _ in range(kills + 1):
        left = kills - len(history)  # kills still to land: each gets its share of the steps left
        high = min(progress + max(1, (steps - 2 - progress) // max(left, 1)), steps - 2)
        target = rng.randint(progress + 1, high) if left and progress + 1 <= high else None
        wait = rng.uniform(0, _step_wait(timed or run))
        code, at = _segment(cmd, env, log, run, target, wait)
        if at is None:
            assert code == 0, f"segment after {history} failed with exit code {code}:\n{_tail(log)}"
            history.append("finished")
            return history
        assert code == -signal.SIGKILL, f"killed segment exited with {code}, not SIGKILL:\n{_tail(log)}"
        history.append(f"killed at {at} logged steps (target {target}, +{wait:.3f}s)")
        progress = max(at, progress)
        cmd = _train_cmd("--resume", run, *extra)
    code, _ = _segment(cmd, env, log, run, None, 0.0)
    assert code == 0, f"final resume after {history} failed with exit code {code}:\n{_tail(log)}"
    history.append("finished")
    return history


def _step_wait(run: Path) -> float:
    """The longest random wait before a kill: a step of this run as its log timed it (a kill lands
    at a random moment of the next step or so, not several steps late where steps are fast), at
    most ``STEP_WAIT``; ``STEP_WAIT`` before the run has logged a step."""
    try:
        times = [json.loads(line).get("step_seconds") for line in (run / "train_log.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return STEP_WAIT
    times = sorted(t for t in times if isinstance(t, (int, float)))
    return min(STEP_WAIT, times[len(times) // 2]) if times else STEP_WAIT


def _differences(ref, got, path: str = "") -> list[str]:
    """Where two checkpoint values differ (tensors compared bit for bit with torch.equal)."""
    if isinstance(ref, torch.Tensor) or isinstance(got, torch.Tensor):
        same = (isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.dtype == got.dtype
                and ref.shape == got.shape and torch.equal(ref, got))  # fmt: skip
        return [] if same else [path]
    if isinstance(ref, dict) and isinstance(got, dict):
        if set(ref) != set(got):
            return [f"{path} keys {sorted(map(str, set(ref) ^ set(got)))}"]
        return [d for k in ref for d in _differences(ref[k], got[k], f"{path}.{k}")]
    if isinstance(ref, (list, tuple)) and isinstance(got, (list, tuple)):
        if len(ref) != len(got):
            return [f"{path} length {len(ref)} != {len(got)}"]
        return [d for i, (a, b) in enumerate(zip(ref, got)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if ref == got else [f"{path} ({ref!r} != {got!r})"]


def _assert_same_as_reference(ref_run: Path, run: Path, steps: int, history: list[str]) -> None:
    ref, got = load_checkpoint(ref_run), load_checkpoint(run)
    assert int(got["step"]) == steps, f"final checkpoint at step {got['step']}, not {steps} ({history})"
    for key in ("model", "ema", "optimizer"):
        diff = _differences(ref[key], got[key], key)
        assert not diff, f"{key} after kills {history} differs from the uninterrupted run at {diff[:5]}"
    timing = ("step_seconds", "images_per_second")  # measured each time, not recomputed
    rows = [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "train_log.jsonl").read_text().splitlines()]  # fmt: skip
    logged = [r["step"] for r in rows]
    assert logged == list(range(1, steps + 1)), f"train_log.jsonl steps {logged} after kills {history}"
    ref_rows = [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (ref_run / "train_log.jsonl").read_text().splitlines()]  # fmt: skip
    assert rows == ref_rows, f"train_log.jsonl values after kills {history} differ from the uninterrupted run's"
    leftovers = sorted(p.name for p in run.glob("*.tmp"))
    assert not leftovers, f"temporary files left in {run} after kills {history}: {leftovers}"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == steps, f"train_summary.json says {summary['steps']} steps ({history})"


# ---------------------------------------------------------------- references


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kill_resume")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "cache"  # the suite's private cache (conftest)


@pytest.fixture(scope="module")
def reference(work, cache) -> tuple[Path, Path]:
    """An uninterrupted single-process run: (config, run dir)."""
    config = _config(work / "tiny.yaml", STEPS, EVERY)
    run, log = work / "A", work / "A.out"
    code, _ = _segment(_train_cmd(config, "--run-dir", run), _env(cache), log, run, None, 0.0)
    assert code == 0, f"reference run failed with exit code {code}:\n{_tail(log)}"
    assert not list(run.glob("*.tmp")), "the reference run left temporary files"
    return config, run


# ---------------------------------------------------------------- tests


def test_random_sigkills_resume_to_identical_weights(reference, work, cache):
    config, ref_run = reference
    rng = random.Random(20261204)
    run, log = work / "B", work / "B.out"
    history = _train_with_kills(rng, run, config, STEPS, EVERY, _env(cache), log, kills=2, timed=ref_run)
    assert sum(h.startswith("killed") for h in history) == 2, f"expected 2 kills to land: {history}"
    _assert_same_as_reference(ref_run, run, STEPS, history)


def test_sigkill_between_checkpoint_tmp_and_rename(reference, work, cache):
    config, ref_run = reference
    rng = random.Random(7)
    pause_at = rng.randint(2, STEPS // EVERY - 1)  # a checkpoint.pt from the write before exists
    hook = work / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    run, log, marker = work / "C", work / "C.out", work / "C.paused"
    env = _env(cache, PYTHONPATH=str(hook), KILL_TEST_PAUSE_AT_CHECKPOINT=str(pause_at), KILL_TEST_MARKER=str(marker))
    proc = _start(_train_cmd(config, "--run-dir", run), env, log)
    try:
        deadline = time.monotonic() + SEGMENT_TIMEOUT
        while not marker.exists():
            assert proc.poll() is None, f"run ended ({proc.returncode}) before the paused write:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"checkpoint write {pause_at} never paused:\n{_tail(log)}"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        _kill_tree(proc)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, f"exit code {proc.returncode}, not SIGKILL"
    tmp = run / "checkpoint.pt.tmp"
    assert tmp.is_file(), "the kill did not land between the checkpoint's .tmp write and its rename"
    tmp_state = torch.load(tmp, map_location="cpu", weights_only=True)
    kept = load_checkpoint(run)  # the previous checkpoint, whole
    assert int(tmp_state["step"]) == pause_at * EVERY and int(kept["step"]) == (pause_at - 1) * EVERY, (
        f"paused write of step {tmp_state['step']}, kept checkpoint at step {kept['step']}; "
        f"expected {pause_at * EVERY} and {(pause_at - 1) * EVERY}"
    )
    code, _ = _segment(_train_cmd("--resume", run), _env(cache), log, run, None, 0.0)
    assert code == 0, f"resume after a kill inside a checkpoint write failed ({code}):\n{_tail(log)}"
    _assert_same_as_reference(ref_run, run, STEPS, [f"killed in checkpoint write {pause_at}", "finished"])


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_random_sigkills_under_two_process_gloo_ddp(work, cache):
    config = _config(work / "tiny_ddp.yaml", DDP_STEPS, DDP_EVERY)
    env = _env(cache)
    ref_run, ref_log = work / "DDP_A", work / "DDP_A.out"
    code, _ = _segment(_train_cmd(config, "--run-dir", ref_run, "--distributed", "2"), env, ref_log, ref_run, None, 0.0)
    assert code == 0, f"uninterrupted 2-process run failed with exit code {code}:\n{_tail(ref_log)}"
    assert json.loads((ref_run / "train_summary.json").read_text())["world_size"] == 2
    rng = random.Random(2)
    run, log = work / "DDP_B", work / "DDP_B.out"
    history = _train_with_kills(rng, run, config, DDP_STEPS, DDP_EVERY, env, log, ("--distributed", "2"), kills=1,
                                timed=ref_run)  # fmt: skip
    assert sum(h.startswith("killed") for h in history) >= 1, f"no kill landed before the run ended: {history}"
    _assert_same_as_reference(ref_run, run, DDP_STEPS, history)
    assert json.loads((run / "train_summary.json").read_text())["world_size"] == 2
