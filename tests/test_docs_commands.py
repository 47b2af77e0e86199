"""Every ``nestar ...`` command written in README.md and docs/*.md parses with the CLI's own parser and,
where it names a config (or a run of a known config, or a study) and ``--set`` overrides, validates.

Commands are taken from fenced code blocks (a ``$`` prompt, comments such as ``# or: nestar ...``,
``VAR=value`` lines substituted into later ``$VAR``, ``torchrun ... -m nestar_lab.cli ...``) and from
inline backticks. Synopses (``[--set KEY=VALUE ...]``, ``markdown|csv``) are parsed with and without
their optional parts; a command with placeholders (``CONFIG``, ``RUN_DIR``, ``runs/x-...``, ``<...>``,
``...``) is parsed only, except that a run of a known config (``runs/quickstart-...``) validates its
overrides against that config as a run directory holds it (every default filled). A bare mention
(``nestar study report``) must name an existing command. A ``$`` command followed by ``config error:``
lines must fail with exactly those lines. Paper configs (``imagenet256/``), whose files the user
supplies, are checked for structure and every part's params, without building any part.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import io
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from nestar_lab.cli import _parser
from nestar_lab.config.errors import ConfigError
from nestar_lab.config.overrides import apply_overrides, load_yaml, read_yaml
from nestar_lab.config.registry import PluginError, get_registry
from nestar_lab.config.schema import COMPONENT_KINDS, ExperimentConfig
from nestar_lab.config.validation import load_config, strict_validate, validate_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
USER_FILES = ("studies/configs/imagenet256/",)  # configs whose data and weights the user supplies
RUNS = {  # a documented run directory -> the config it was trained from
    "runs/quickstart-": "studies/configs/quickstart.yaml",
    "runs/imagenet256-nestar-b-": "studies/configs/imagenet256/nestar_b.yaml",
}
INTS = {"N": "2", "W": "2", "S": "2"}  # placeholders of integer options (--distributed N, --trials N)
PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>|\$\{?\w+|^[A-Z][A-Z0-9_]*(\.[a-z0-9]+)?$|[A-Z]+=[A-Z]+")


@dataclass(frozen=True)
class Command:
    """One documented command: ``argv`` after ``nestar``, where it is written, what it must print."""

    argv: tuple[str, ...]
    where: str
    expected_errors: tuple[str, ...] = ()  # the ``config error:`` lines shown after a ``$`` command
    packages: tuple[str, ...] = ()  # plugin packages installed earlier in the same code block
    text: str = field(default="", compare=False)


# ---------------------------------------------------------------------------------------- extraction


def _split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its ``#`` comment (a ``#`` inside quotes or a word is no comment)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :]
    return line, ""


def _argv(text: str, env: dict[str, str]) -> list[str] | None:
    """The arguments after ``nestar`` if ``text`` is a nestar command, else None."""
    for name, value in env.items():
        text = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", value, text)
    try:
        tokens = shlex.split(text)
    except ValueError:
        return None
    if tokens[:1] == ["time"]:
        tokens = tokens[1:]
    if tokens[:1] in (["nestar"], [".venv/bin/nestar"]):
        return tokens[1:]
    if tokens[:1] and Path(tokens[0]).name in ("torchrun", "python", "python3") and "nestar_lab.cli" in tokens:
        i = tokens.index("nestar_lab.cli")
        return tokens[i + 1 :] if tokens[i - 1] == "-m" else None
    return None


IN_PROSE = re.compile(r"(?<![\w./-])((?:\.venv/bin/)?nestar\s.*)")  # e.g. "# or: nestar train $CFG ..."


def extract(text: str, source: str) -> list[Command]:
    """Every nestar command in a markdown text (``source`` names it in the commands' ``where``)."""
    commands: list[Command] = []
    env: dict[str, str] = {}
    fenced, packages = False, ()
    lines = text.splitlines()

    def add(raw: str, n: int, expected=()):
        argv = _argv(raw, env)
        if argv:  # a bare `nestar` names the tool (or the generator), no command
            commands.append(Command(tuple(argv), f"{source}:{n}", tuple(expected), packages, raw.strip()))

    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced, packages = not fenced, ()
            continue
        spans = re.findall(r"`([^`]+)`", line)
        if fenced:
            code, comment = _split_comment(line)
            code = code.strip()
            expected = []
            if code.startswith("$ "):
                code = code[2:]
                for out in lines[n:]:  # the output shown below the command
                    if out.startswith(("$ ", "```")):
                        break
                    if out.startswith("config error: "):
                        expected.append(out.removeprefix("config error: "))
            assignment = re.fullmatch(r"([A-Za-z_]\w*)=(\S+)", code)
            if assignment:
                env[assignment[1]] = shlex.split(assignment[2])[0]
            installed = re.search(r"pip install (?:-e )?(\S+)", code)
            if installed and not installed[1].strip("'\"").startswith("nestar-lab["):  # a local plugin package
                packages = (*packages, installed[1])
            add(code, n, expected)
            for found in IN_PROSE.findall(comment):
                add(found, n)
        for span in spans:
            add(span, n)
    return commands


def documented_commands() -> list[Command]:
    return [c for path in DOCS for c in extract(path.read_text(), str(path.relative_to(ROOT)))]


# ------------------------------------------------------------------------------------------ checking


def _variants(argv: tuple[str, ...]) -> list[list[str]]:
    """The argument lists a synopsis stands for: without its ``[optional]`` parts and with all of
    them (``a|b`` -> ``a``); a ``...`` after a value means "repeat" and is dropped."""
    synopsis = any(t.startswith("[") for t in argv)
    bare, full, depth = [], [], 0
    for token in argv:
        if synopsis:  # brackets mark optional parts (a value such as loggers=[...] keeps its own)
            depth += len(token) - len(token.lstrip("["))
        inside = depth > 0
        if synopsis:
            depth -= len(token) - len(token.rstrip("]"))
            token = token.strip("[]")
        if synopsis and "|" in token:
            token = token.split("|")[0]
        if token == "..." and full and not full[-1].startswith("-"):
            continue
        full.append(token)
        if not inside:
            bare.append(token)
    variants = [full] if not synopsis else [bare, full]
    out = []
    for tokens in variants:
        tokens = [INTS.get(t, t) for t in tokens]
        sub = next((i for i, t in enumerate(tokens) if not t.startswith("-")), None)
        if sub is not None and tokens[sub] == "...":  # ``nestar --debug ...``: any command
            tokens[sub] = "plugins"
        out.append(tokens)
    return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _parse(argv: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return _parser().parse_args(argv)
        except SystemExit:
            message = err.getvalue().strip().splitlines()
            raise AssertionError(f"does not parse: {message[-1] if message else 'exit'}") from None


def _is_mention(argv: list[str]) -> bool:
    """``nestar run``, ``nestar study report``: command words only (no arguments to check)."""
    parser, words = _parser(), [t for t in argv if t != "--debug"]
    for word in words:
        choices = _subcommands(parser)
        if word not in choices:
            return False
        parser = choices[word]
    return bool(words)


def _placeholder(token: str) -> bool:
    return bool(PLACEHOLDER.search(token))


def validate_structure(raw: dict[str, Any]) -> ExperimentConfig:
    """A config whose files the user supplies: its structure and every part's params, strictly,
    without building any part (no files are read)."""
    errors: list[str] = []
    cfg = strict_validate(ExperimentConfig, raw, "", errors)
    if cfg is not None:
        parts = [(f, kind, getattr(cfg, f)) for f, kind in COMPONENT_KINDS.items()]
        for where, kind, spec in parts + [(f"metrics.{i}", "metric", m) for i, m in enumerate(cfg.metrics)]:
            try:
                cls = get_registry().get(kind, spec.name)
            except PluginError as exc:
                errors.append(f"{where}.name: {exc}")
                continue
            strict_validate(cls.Params, spec.params, f"{where}.params", errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def _needs_user_files(path: str | Path) -> bool:
    return any(str(Path(path).resolve()).startswith(str(ROOT / p)) for p in USER_FILES)


@functools.cache
def _run_config(config: str) -> str:
    """The ``config.yaml`` a run of ``config`` holds (resolved: every default filled), as text."""
    if _needs_user_files(config):
        return (ROOT / config).read_text()
    return yaml.safe_dump(load_config(ROOT / config).model_dump(mode="json"), sort_keys=False)


def _validate(raw: dict[str, Any], overrides: list[str] | dict[str, Any], structure_only: bool) -> None:
    raw = apply_overrides(copy.deepcopy(raw), overrides)
    validate_structure(raw) if structure_only else validate_config(raw)


def _study_trials(spec) -> list[dict[str, Any]]:
    """A study's explicit arms, its first choices, and each choice (and range end) of each key."""

    def pick(fixed: dict[str, Any]) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for key, space in spec.space.items():
            if all(chosen.get(other) in values for other, values in space.condition.items()):
                first = space.choices[0] if space.choices is not None else (space.int_range or space.float_range)[0]
                chosen[key] = fixed.get(key, first)
        return chosen

    trials = [dict(arm) for arm in spec.arms] + [pick({})]
    for key, space in spec.space.items():
        values = space.choices if space.choices is not None else list(space.int_range or space.float_range)
        trials += [pick({key: v}) for v in values]
    unique = []
    for t in trials:
        if t not in unique:
            unique.append(t)
    return unique


@contextlib.contextmanager
def _plugin_packages(paths: tuple[str, ...]):
    """The plugins of packages the docs install (``pip install -e examples/...``), registered for
    the duration, as installing them would."""
    if not paths:
        yield
        return
    from nestar_lab.config import registry

    sources = [ROOT / p / "src" if (ROOT / p / "src").is_dir() else ROOT / p for p in paths]
    sys.path[:0] = [str(s) for s in sources]
    modules = [importlib.import_module(d.name) for s in sources for d in sorted(s.iterdir()) if (d / "__init__.py").is_file()]
    original = registry.make_manager
    registry.make_manager = lambda extra_plugins=(): original(extra_plugins=(*extra_plugins, *modules))
    registry.get_registry.cache_clear()
    try:
        yield
    finally:
        registry.make_manager = original
        registry.get_registry.cache_clear()
        for s in sources:
            sys.path.remove(str(s))


def check(command: Command) -> str:
    """Parse ``command`` and validate what it names; raise AssertionError naming it if it is wrong.
    Returns how far it was checked (``mention``, ``parsed``, ``validated``), for the summary."""
    try:
        return _check(command)
    except (AssertionError, ConfigError, PluginError) as exc:
        raise AssertionError(f"{command.where}: `nestar {' '.join(command.argv)}`: {exc}") from None


def _check(command: Command) -> str:
    if _is_mention(list(command.argv)):
        return "mention"
    how = "parsed"
    for argv in _variants(command.argv):
        args = _parse(argv)
        overrides = list(getattr(args, "overrides", None) or [])
        if any(_placeholder(o) for o in overrides) or "..." in argv or any(a.startswith("[") for a in command.argv):
            continue  # a synopsis or placeholder values: the parser is all there is to check
        expected = list(command.expected_errors)
        with _plugin_packages(command.packages):
            try:
                checked = _validate_args(args, overrides)
            except ConfigError as exc:
                if exc.lines != expected:
                    raise ConfigError(exc.lines if not expected else [f"expected {expected}, got {exc.lines}"]) from None
                checked = True
            else:
                assert not (checked and expected), f"should fail with {expected}, but validates"
        how = "validated" if checked else how
    return how


def _validate_args(args: argparse.Namespace, overrides: list[str]) -> bool:
    """Validate the config, run or study ``args`` name; False when they name none that can be."""
    config = getattr(args, "config", None)
    run_dir = getattr(args, "run_dir", None) or getattr(args, "resume", None)
    if config is not None:
        if _placeholder(config):
            return False
        path = ROOT / config
        if _needs_user_files(path):
            _validate(read_yaml(path), overrides, structure_only=True)
        else:
            validate_config(apply_overrides(read_yaml(path), overrides))
        return True
    if run_dir is not None:
        base = next((cfg for prefix, cfg in RUNS.items() if run_dir.startswith(prefix)), None)
        if base is None:
            return False
        _validate(load_yaml(_run_config(base)), overrides, structure_only=_needs_user_files(base))
        return True
    if args.command == "study" and not _placeholder(args.study):
        from nestar_lab.sweep.study import load_study

        with contextlib.chdir(ROOT):
            spec = load_study(args.study)
            base = read_yaml(spec.base_path())
            for trial in _study_trials(spec):
                try:
                    _validate(base, {**spec.overrides, **trial}, _needs_user_files(spec.base_path()))
                except ConfigError as exc:
                    raise ConfigError([f"study {spec.name}, trial {trial}: {'; '.join(exc.lines)}"]) from None
        return True
    return False


# --------------------------------------------------------------------------------------------- tests

COMMANDS = documented_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where}:{' '.join(c.argv)[:60]}")
def test_documented_command(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    check(command)


def test_the_docs_commands_are_all_found():
    where = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/paper_scale.md", "docs/runs.md", "docs/evaluation.md", "docs/benchmarks.md"} <= where
    argvs = {" ".join(c.argv) for c in COMMANDS}
    for swap in (
        "run studies/configs/quickstart.yaml --set coordination.name=none",
        "describe studies/configs/imagenet256/nestar_b.yaml",  # CFG=... then nestar describe $CFG
        "train studies/configs/imagenet256/nestar_b.yaml --distributed 8",  # in a comment: "# or: nestar train ..."
        "eval runs/imagenet256-nestar-b-...",  # torchrun ... -m nestar_lab.cli eval ...
        "run studies/configs/quickstart.yaml --run-dir runs/quickstart-doc",  # `time .venv/bin/nestar run ...`
        "study report coordination_ablation",
    ):
        assert swap in argvs
    shown = [c for c in COMMANDS if c.expected_errors]
    assert shown and shown[0].expected_errors == (
        "train.lr: got -1; input should be greater than 0",
        "generator.params: NestAR needs n = k^M tokens; got n=64, k=3 (the tokenizer makes 64 tokens)",
    )
    assert any(c.packages for c in COMMANDS)  # the example plugin package's commands


SYNTHETIC = """
# A page

Run `nestar run studies/configs/quickstart.yaml --set coordination.name=none` or
`nestar describe CONFIG`; see `nestar study report`.

```bash
CFG=studies/configs/quickstart.yaml
nestar run $CFG --set ode_solver.name=dopri5      # or: nestar train $CFG --set train.steps=5
nestar eval runs/quickstart-... --set ode_solver.name=rk4 --set ode_solver.params.steps=4
nestar table [--where k=4] [--format markdown|csv]
```

```
$ nestar train studies/configs/quickstart.yaml --set train.lr=-1
config error: train.lr: got -1; input should be greater than 0
```
"""


def test_the_checker_passes_good_commands(monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = extract(SYNTHETIC, "page.md")
    assert [c.argv[0] for c in commands] == ["run", "describe", "study", "run", "train", "eval", "table", "train"]
    assert [check(c) for c in commands] == [
        "validated", "parsed", "mention", "validated", "validated", "validated", "parsed", "validated"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "broken, problem",
    [
        ("`nestar runn studies/configs/quickstart.yaml`", "does not parse: .*invalid choice: 'runn'"),
        ("`nestar run studies/configs/quickstart.yaml --sett a=1`", "does not parse: .*unrecognized arguments: --sett"),
        ("`nestar sample RUN_DIR --num many`", "does not parse: .*expected an integer of at least 1, got 'many'"),
        ("`nestar study rerun`", "does not parse: .*invalid choice: 'rerun'"),
        ("`nestar run studies/configs/quickstart.yaml --set ode_solver.name=rk5`", "ode_solver.name: .*rk5"),
        ("`nestar run studies/configs/quickstart.yaml --set coordination.params.weights=1`", "coordination.params.weights"),
        ("`nestar run studies/configs/quickstart.yaml --set metrics.7.name=speed`", "metrics.7: the list has 5 items"),
        ("`nestar run studies/configs/nope.yaml`", "no such config file"),
        ("`nestar eval runs/quickstart-... --set ode_solver.params.rtol=1e-3`", "ode_solver.params.rtol"),
        ("`nestar describe studies/configs/imagenet256/nestar_b.yaml --set generator.params.kk=4`", "generator.params.kk"),
        ("`nestar study run no_such_study`", "no_such_study"),
        ("```\n$ nestar train studies/configs/quickstart.yaml --set train.lr=-1\nconfig error: train.lr: wrong\n```",
         r"expected \['train.lr: wrong'\]"),
        ("```\n$ nestar train studies/configs/quickstart.yaml\nconfig error: train.lr: got -1\n```", "should fail with"),
    ],
)
def test_the_checker_catches_a_broken_command(broken, problem, monkeypatch):
    monkeypatch.chdir(ROOT)
    (command,) = extract(broken, "page.md")
    with pytest.raises(AssertionError, match=f"^page.md:\\d+: `nestar .*`: .*{problem}"):
        check(command)


def test_a_study_with_a_trial_that_cannot_validate_is_caught(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    study = tmp_path / "broken.yaml"
    study.write_text(
        f"name: broken\nbase: {ROOT / 'studies/configs/study_base.yaml'}\n"
        "space:\n  ode_solver.name: {choices: [euler, rk5]}\n"
        "objectives: [{metric: fid_digits_cnn, direction: minimize}]\n"
    )
    (command,) = extract(f"`nestar study run {study}`", "page.md")
    with pytest.raises(AssertionError, match="space.ode_solver.name='rk5': ode_solver.name: unknown ode_solver 'rk5'"):
        check(command)
