"""Every failure a user can cause or meet: one line on stderr and a documented exit code.

2 bad input (config, file, place, plugin), 1 failed run (memory, disk, unexpected error),
130 SIGINT, 143 SIGTERM; the traceback only with ``--debug`` or ``NESTAR_DEBUG=1``.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from nestar_lab.cli import main
from nestar_lab.config import errors
from nestar_lab.config.registry import get_registry

HINT = "(rerun with --debug for the traceback)"


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    """Exit code, stderr lines, stdout of one ``nestar`` call in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


@pytest.fixture
def cfg_file(tiny_raw, tmp_path):
    def write(raw=None, name="cfg.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw if raw is not None else tiny_raw))
        return path

    return write


# ----------------------------------------------------------------------------- bad configs: exit 2
def _set(raw, dotted, value):
    *parents, last = dotted.split(".")
    for p in parents:
        raw = raw.setdefault(p, {})
    raw[last] = value


BAD_CONFIGS = {  # edits of the tiny config (in the YAML file) or --set overrides -> the fields named, one line each
    "inf_lr": ({"train.lr": float("inf")}, [], ["train.lr: got inf; must be a finite number"]),
    "nan_lr_yaml": ({"train.lr": float("nan")}, [], ["train.lr: got nan; must be a finite number"]),
    "nan_lr_set": ({}, ["train.lr=.nan"], ["train.lr: got nan; must be a finite number"]),
    "nan_word_set": ({}, ["train.lr=nan"], ["train.lr: got 'nan'; input should be a valid number"]),
    "huge_lr": ({}, ["train.lr=1e999"], ["train.lr: got inf; must be a finite number"]),
    "bool_steps": ({"train.steps": True}, [], ["train.steps: got True; input should be a valid integer"]),
    "bool_steps_set": ({}, ["train.steps=true"], ["train.steps: got True; input should be a valid integer"]),
    "string_batch": ({"train.batch_size": "32"}, [], ["train.batch_size: got '32'; input should be a valid integer"]),
    "float_steps": ({}, ["train.steps=6.0"], ["train.steps: got 6.0"]),
    "bad_k_and_bad_lr": ({"train.lr": float("inf"), "generator.params.k": "four"}, [],
                         ["train.lr: got inf", "generator.params.k: got 'four'"]),  # fmt: skip
    "low_k_and_negative_lr": ({}, ["train.lr=-1", "generator.params.k=1"],
                              ["train.lr: got -1", "generator.params.k: got 1"]),  # fmt: skip
    "unknown_plugin": ({"ode_solver.name": "rk45"}, [], ["ode_solver.name: unknown ode_solver 'rk45'"]),
    "unknown_field": ({"train.stepz": 3}, [], ["train.stepz: got 3; extra inputs are not permitted"]),
    "flow_inf": ({}, ["flow.logit_std=.inf"], ["flow.logit_std: got inf; must be a finite number"]),
    "plugin_param_inf": ({}, ["scale_module.params.mlp_ratio=.inf"],
                         ["scale_module.params.mlp_ratio: got inf; must be a finite number"]),  # fmt: skip
    "plugin_param_bool": ({}, ["scale_module.params.depth=true"], ["scale_module.params.depth: got True"]),
    "three_layers": ({"train.stepz": 1}, ["sample.cfg_scale=-.inf", "ode_solver.params.steps=0", "metrics.0.params.epochs=x"],
                     ["train.stepz:", "sample.cfg_scale: got -inf", "ode_solver.params.steps: got 0",
                      "metrics.0.params.epochs: got 'x'"]),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_one_line_per_problem_exit_2(case, tiny_raw, cfg_file, capsys):
    edits, overrides, expected = BAD_CONFIGS[case]
    for dotted, value in edits.items():
        _set(tiny_raw, dotted, value)
    argv = ["train", cfg_file(tiny_raw)] + [a for o in overrides for a in ("--set", o)]
    code, lines, _ = run_cli(argv, capsys)
    assert code == 2, lines
    assert len(lines) == len(expected), lines
    for line, want in zip(sorted(lines), sorted(expected)):
        assert line.startswith(f"config error: {want}"), (line, want)
    assert not Path(tiny_raw["output_dir"]).exists(), "no work may start on a bad config"


@pytest.mark.parametrize("content, want", [
    (None, "no such config file"),
    ("train: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of config sections, got list"),
    (b"\xff\xfe\x00binary", "not a text file"),
])  # fmt: skip
def test_bad_config_file_is_one_line_naming_it(content, want, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, lines, _ = run_cli(["describe", path], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"config error: {path}: ") and want in lines[0]


def test_directory_as_config_file(tmp_path, capsys):
    code, lines, _ = run_cli(["describe", tmp_path], capsys)
    assert code == 2 and lines == [f"config error: {tmp_path}: a directory, not a config file"]


# ----------------------------------------------------------------------------- plugin packages
def _plugin_package(root: Path, dist: str, version: str, ep: str, module: str, body: str) -> None:
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[nestar_lab]\n{ep} = {module}\n")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install plugin packages for this test only (a fresh registry before and after)."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules = []

    def install(*args):
        _plugin_package(site, *args)
        modules.append(args[3])
        get_registry.cache_clear()

    yield install
    for m in modules:
        sys.modules.pop(m, None)
    get_registry.cache_clear()


BROKEN = "raise RuntimeError('boom on import')\n"
DUPLICATE = """
    from nestar_lab.hookspecs import hookimpl
    from nestar_plugins.ode_solvers.torchdiffeq_solvers import FixedGridSolver

    @hookimpl
    def nestar_register_ode_solvers():
        return {"euler": FixedGridSolver}
"""


def test_broken_plugin_package_is_one_warning_and_other_commands_work(installed, cfg_file, capsys):
    installed("broken-nestar-pkg", "0.1", "broken_ep", "broken_nestar_pkg", BROKEN)
    code, lines, out = run_cli(["plugins"], capsys)
    assert code == 0 and any(line.split()[:2] == ["ode_solver", "euler"] for line in out.splitlines())
    (warning,) = lines
    assert warning.startswith("warning: plugin package broken-nestar-pkg 0.1 (broken_ep) failed to load")
    assert "RuntimeError: boom on import" in warning and "uninstall" in warning

    get_registry.cache_clear()
    code, lines, out = run_cli(["describe", cfg_file()], capsys)  # a config that does not need it
    assert code == 0 and "total:" in out
    assert len(lines) == 1 and lines[0].startswith("warning: plugin package broken-nestar-pkg 0.1 (broken_ep)")


def test_config_asking_for_a_plugin_of_a_broken_package_names_it(installed, tiny_raw, cfg_file, capsys):
    installed("broken-nestar-pkg", "0.1", "broken_ep", "broken_nestar_pkg", BROKEN)
    tiny_raw["ode_solver"] = {"name": "broken_solver"}
    code, lines, _ = run_cli(["train", cfg_file(tiny_raw)], capsys)
    assert code == 2
    (line,) = lines
    assert line.startswith("config error: ode_solver.name: unknown ode_solver 'broken_solver'")
    assert "broken-nestar-pkg 0.1 (broken_ep) failed to load" in line and "boom on import" in line


def test_duplicate_plugin_name_is_reported_once(installed, cfg_file, capsys):
    installed("dup-nestar-pkg", "0.2", "dup_ep", "dup_nestar_pkg", DUPLICATE)
    both = "two ode_solver plugins are named 'euler': one from dup-nestar-pkg 0.2 (dup_ep), one from nestar-lab 0.1.0 (ode_solvers)"
    code, lines, _ = run_cli(["plugins"], capsys)
    assert code == 0 and len(lines) == 1 and lines[0].startswith(f"warning: {both}")

    get_registry.cache_clear()
    code, lines, _ = run_cli(["train", cfg_file()], capsys)  # the tiny config uses euler
    assert code == 2
    assert lines == [f"config error: ode_solver.name: {both}; rename or uninstall one of them"]


def test_misspelt_hook_in_a_package_is_a_warning(installed, capsys):
    installed("typo-nestar-pkg", "0.3", "typo_ep", "typo_nestar_pkg", """
        from nestar_lab.hookspecs import hookimpl

        @hookimpl
        def nestar_register_ode_solver():
            return {}
    """)
    code, lines, _ = run_cli(["plugins"], capsys)
    assert code == 0 and len(lines) == 1
    assert "typo-nestar-pkg 0.3 (typo_ep)" in lines[0] and "nestar_register_ode_solver" in lines[0]


# ----------------------------------------------------------------------------- failed runs: exit 1
@pytest.fixture
def train_raises(monkeypatch):
    """Make ``nestar train`` raise ``exc`` where training would start (the config is validated first)."""
    import nestar_lab.run.train

    def install(exc):
        def fake_train(cfg, run_dir=None, **kwargs):
            raise exc

        monkeypatch.setattr(nestar_lab.run.train, "train", fake_train)

    return install


def test_unexpected_error_is_one_line_with_the_debug_hint(train_raises, cfg_file, capsys, monkeypatch):
    monkeypatch.delenv("NESTAR_DEBUG", raising=False)
    train_raises(ZeroDivisionError("boom\nsecond line"))
    code, lines, _ = run_cli(["train", cfg_file()], capsys)
    assert code == 1 and lines == [f"error: ZeroDivisionError: boom {HINT}"]


@pytest.mark.parametrize("how", ["--debug first", "--debug last", "NESTAR_DEBUG=1"])
def test_traceback_only_with_debug(how, train_raises, cfg_file, capsys, monkeypatch):
    train_raises(ZeroDivisionError("boom"))
    argv = ["train", cfg_file()]
    if how == "--debug first":
        argv = ["--debug", *argv]
    elif how == "--debug last":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv("NESTAR_DEBUG", "1")
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("Traceback") and "fake_train" in err
    assert err.splitlines()[-1] == f"error: ZeroDivisionError: boom {HINT}"


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore"),
                                 MemoryError()])  # fmt: skip
def test_out_of_memory_names_the_batch_size(exc, train_raises, cfg_file, capsys):
    train_raises(exc)
    code, lines, _ = run_cli(["train", cfg_file()], capsys)
    assert code == 1
    assert lines == ["error: out of memory at train.batch_size=32; lower train.batch_size "
                     "(--set train.batch_size=...) or use a smaller model"]  # fmt: skip


def test_disk_full_names_the_file(train_raises, cfg_file, capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoint.pt.tmp")
    train_raises(full)
    code, lines, _ = run_cli(["train", cfg_file()], capsys)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("error: No space left on device: /runs/x/checkpoint.pt.tmp")

    try:  # deep inside a library: the OSError is the cause of another error
        raise RuntimeError("PytorchStreamWriter failed writing file data/0") from full
    except RuntimeError as wrapped:
        train_raises(wrapped)
    code, lines, _ = run_cli(["train", cfg_file()], capsys)
    assert code == 1 and len(lines) == 1 and "No space left on device: /runs/x/checkpoint.pt.tmp" in lines[0]


@pytest.mark.parametrize("exc, want", [
    (PermissionError(errno.EACCES, "Permission denied", "/ro/run"), "error: Permission denied: /ro/run; choose a writable place"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"), "error: Read-only file system: /ro/run; "),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/runs/x/grid.png"), "error: Is a directory: /runs/x/grid.png; "),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/run"), "error: Not a directory: /f/run; "),
    (FileExistsError(errno.EEXIST, "File exists", "/runs/x"), "error: File exists: /runs/x; "),
])  # fmt: skip
def test_unwritable_places_are_bad_input_naming_the_path(exc, want, train_raises, cfg_file, capsys):
    train_raises(exc)
    code, lines, _ = run_cli(["train", cfg_file()], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(want), lines


def test_run_dir_under_a_file_is_one_line(cfg_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, lines, _ = run_cli(["train", cfg_file(), "--run-dir", blocker / "run"], capsys)
    assert code == 2 and len(lines) == 1 and str(blocker) in lines[0], lines


def test_keyboard_interrupt_outside_training_is_130(train_raises, cfg_file, capsys):
    train_raises(KeyboardInterrupt())
    code, lines, _ = run_cli(["train", cfg_file()], capsys)
    assert code == 130 and lines == ["interrupted"]


def test_interrupt_exit_code_follows_the_signal(monkeypatch, cfg_file, tmp_path, capsys):
    import nestar_lab.run.train
    from nestar_lab.run.train import TrainingInterrupted

    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130), (None, 130)):
        def fake_train(cfg, run_dir=None, signum=signum, **kwargs):
            raise TrainingInterrupted(tmp_path / "run", 3, signum)

        monkeypatch.setattr(nestar_lab.run.train, "train", fake_train)
        got, lines, _ = run_cli(["train", cfg_file()], capsys)
        assert got == code and lines == [f"interrupted at step 3; resume with: nestar train --resume {tmp_path / 'run'}"]


def test_sigterm_during_training_exits_143(tiny_raw, cfg_file, tmp_path):
    """A real ``nestar train`` process, SIGTERM after its first logged step."""
    tiny_raw["train"].update(steps=100000, log_every=1, checkpoint_every=100000)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nestar_lab.cli", "train", str(cfg_file(tiny_raw)), "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "train_log.jsonl").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("interrupted at step ") and "--resume" in err
    assert (run / "checkpoint.pt").is_file()


# ----------------------------------------------------------------------------- errors.describe
def test_describe_classifies():
    assert errors.describe(errors.RunFailed("x"))[0] == 1
    assert errors.describe(errors.BadInput("x\ny")) == (2, ["error: x"])
    assert errors.describe(MemoryError(), "sample.batch_size=256")[1][0].startswith(
        "error: out of memory at sample.batch_size=256; lower sample.batch_size"
    )
    assert errors.describe(FileNotFoundError("PATH: no checkpoint; train it first")) == (2, ["error: PATH: no checkpoint; train it first"])
    assert errors.describe(KeyError("no column 'x'")) == (2, ["error: no column 'x'"])
    assert errors.describe(RuntimeError("")) == (1, [f"error: RuntimeError {HINT}"])
    assert errors.exit_code_for_signal(signal.SIGTERM) == 143 and errors.exit_code_for_signal(None) == 130


def test_study_run_warns_about_a_broken_plugin_package_before_its_trials(installed, tiny_raw, tmp_path, capsys,
                                                                          monkeypatch):  # fmt: skip
    import optuna

    from nestar_lab.sweep import tuning

    installed("broken-nestar-pkg", "0.1", "broken_ep", "broken_nestar_pkg", BROKEN)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_raw))
    spec = {"name": "warn_study", "base": "base.yaml", "output_dir": str(tmp_path / "studies"),
            "space": {"train.lr": {"float": [1e-4, 1e-3]}},
            "objectives": [{"metric": "nn_train_dist_generated", "direction": "minimize"}]}  # fmt: skip
    (tmp_path / "warn_study.yaml").write_text(yaml.safe_dump(spec))
    seen = []

    def fake_run_study(spec, *args, **kwargs):  # what was on stderr when the trials would start
        seen.append(capsys.readouterr().err)
        return optuna.create_study()

    monkeypatch.setattr(tuning, "run_study", fake_run_study)
    code, lines, out = run_cli(["study", "run", str(tmp_path / "warn_study.yaml")], capsys)
    assert code == 0 and out.startswith("study warn_study: 0 trials")
    (before,) = seen
    assert before.startswith("warning: plugin package broken-nestar-pkg 0.1 (broken_ep) failed to load")
