"""The ``nestar`` command: thin wrappers around the library.

    nestar train CONFIG [--set KEY=VALUE ...] [--run-dir DIR]   |   nestar train --resume RUN_DIR
    nestar train CONFIG --distributed N    (or: torchrun --nproc_per_node=N -m nestar_lab.cli train CONFIG)
    nestar cache-latents CONFIG        encode the train split once into data.latent_cache
    nestar sample RUN_DIR [--num N] [--out FILE.png] [--seed S] [--set sample.cfg_scale=3]
    nestar run CONFIG [--set ...]      train, sample, evaluate (metrics.json, samples.png)
    nestar eval RUN_DIR                evaluate a trained run again
    nestar table [--where k=4] [--by generator,ode_solver [--reference VALUE]] [--metrics ...] [--format csv]
    nestar plot --y fid_digits_cnn [--x sec_per_image] [--out tradeoff.png]
    nestar study run STUDY [--trials N] [--timeout S] [--storage URL] [--workers W] [--dry-run]
    nestar study report STUDY
    nestar describe CONFIG             tokens, modules, sequential steps, parameter counts
    nestar ref-stats CONFIG --out FILE.npz [--split train|test]   ADM-layout reference statistics
    nestar plugins                     every registered plugin: kind, name, provider

Every failure ends with one line on stderr (one per problem for a config) and an exit code:
2 bad input, 1 failed run, 130 SIGINT, 143 SIGTERM (``nestar_lab.config.errors``); ``--debug`` (before
or after the command) or ``NESTAR_DEBUG=1`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections import Counter
from pathlib import Path

from nestar_lab.config.errors import describe, exit_code_for_signal  # light: the rest loads in main
from nestar_lab.run import interrupts

#: the batch-size setting of the work in progress, named when memory runs out
_context: dict[str, str | None] = {"batch": None}


def _at_least_one(text: str) -> int:
    """An argparse type: an integer of at least 1 (0 or a negative count is refused, not ignored)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestar", description="Nested AutoRegressive models: a research sandbox")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also: NESTAR_DEBUG=1)")
    debug = argparse.ArgumentParser(add_help=False)  # --debug also after the command
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add_parser(*a, parents=[debug, *kw.pop("parents", [])], **kw)

    def add_set(sp):
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. generator.params.k=4 (repeatable)")  # fmt: skip

    t = sub.add_parser("train", help="train a config (or resume a run)")
    t.add_argument("config", nargs="?", help="experiment YAML")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument("--run-dir", help="where to put the run (default: output_dir/name-time)")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in --run-dir (its files are removed)")
    t.add_argument("--distributed", type=_at_least_one, metavar="N", default=None,
                   help="launch N processes with torchrun on this machine (DDP; one per GPU)")  # fmt: skip
    add_set(t)

    c = sub.add_parser("cache-latents", help="encode the train split once into data.latent_cache (resumable)")
    c.add_argument("config")
    add_set(c)

    r = sub.add_parser("run", help="train, then sample and evaluate")
    r.add_argument("config")
    r.add_argument("--run-dir")
    r.add_argument("--overwrite", action="store_true", help="replace the run already in --run-dir")
    add_set(r)

    s = sub.add_parser("sample", help="write a grid of samples (one row per class)")
    s.add_argument("run_dir")
    s.add_argument("--num", type=_at_least_one, default=100, help="images in all (split evenly over classes)")
    s.add_argument("--out", default=None, help="PNG path (default RUN_DIR/grid.png)")
    s.add_argument("--seed", type=int, default=0)
    add_set(s)

    e = sub.add_parser("eval", help="evaluate a trained run (metrics.json)")
    e.add_argument("run_dir")
    add_set(e)

    tb = sub.add_parser("table", help="results of evaluated runs as a table")
    tb.add_argument("--results-dir", default=None, help="output_dir holding results.csv (default: runs)")
    tb.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE", help="filter (repeatable)")
    tb.add_argument("--by", default="", help="group by these columns (comma-separated), averaging metrics")
    tb.add_argument("--metrics", default="", help="metric columns to show (comma-separated; default all)")
    tb.add_argument("--reference", default=None, metavar="VALUE",
                    help="with --by: pair every group with this one over seeds (mean, 95%% interval, paired difference)")
    tb.add_argument("--format", choices=["markdown", "csv"], default="markdown")

    pl = sub.add_parser("plot", help="quality against speed, one point per run, Pareto front marked")
    pl.add_argument("--results-dir", default=None)
    pl.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE")
    pl.add_argument("--x", default="sec_per_image", help="cost axis (default sec_per_image)")
    pl.add_argument("--y", required=True, help="quality axis, e.g. fid_digits_cnn")
    pl.add_argument("--out", default="tradeoff.png")

    st = sub.add_parser("study", help="Optuna studies: run, report")
    st_sub = st.add_subparsers(dest="study_command", required=True)
    _add_study_parser = st_sub.add_parser
    st_sub.add_parser = lambda *a, **kw: _add_study_parser(*a, parents=[debug, *kw.pop("parents", [])], **kw)
    sr = st_sub.add_parser("run", help="run (or continue) a study")
    sr.add_argument("study", help="studies/NAME.yaml or NAME")
    sr.add_argument("--trials", type=_at_least_one, default=None, help="total trials (default: the study's)")
    sr.add_argument("--timeout", type=_positive_seconds, default=None, help="seconds")
    sr.add_argument("--storage", default=None, help="SQLAlchemy URL or journal:PATH (default: SQLite in the study dir)")
    sr.add_argument("--workers", type=_at_least_one, default=1, help="processes sharing the storage")
    sr.add_argument("--dry-run", action="store_true",
                    help="check the study and print what is left and its cost (a timed step); train nothing")
    sp = st_sub.add_parser("report", help="best trials, trials x metrics table, plots")
    sp.add_argument("study")
    sp.add_argument("--storage", default=None)

    d = sub.add_parser("describe", help="tokens, schedule, sequential steps and parameter counts of a config")
    d.add_argument("config")
    add_set(d)

    rs = sub.add_parser("ref-stats", help="write a split's FID statistics and reference images (ADM's .npz layout)")
    rs.add_argument("config", help="experiment YAML; its fidelity metric's extractor is used")
    rs.add_argument("--out", required=True, help="the .npz to write (mu, sigma, arr_0)")
    rs.add_argument("--split", choices=["train", "test"], default="train")
    add_set(rs)

    sub.add_parser("plugins", help="list registered plugins")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error ends as one line on stderr and an exit code (see ``errors``).
    Only the standard library, ``errors`` and ``interrupts`` are imported before this runs, so a Ctrl-C at any
    moment (the heavy imports included) ends as ``interrupted`` and 130, even where a library
    caught the KeyboardInterrupt and failed otherwise (a half-imported plugin package)."""
    previous = interrupts.catch_sigint()
    try:
        argv = list(argv if argv is not None else sys.argv[1:])
        args = _parser().parse_args(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exit_code_for_signal(None)
    args.argv = argv
    debug = args.debug or os.environ.get("NESTAR_DEBUG", "").strip() not in ("", "0")
    _context["batch"] = None
    try:
        return COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as exc:
        if debug:
            traceback.print_exc()
        if interrupts.seen():  # whatever the interrupt turned into on its way here
            print("interrupted", file=sys.stderr)
            return exit_code_for_signal(None)
        code, lines = describe(exc, batch_hint=_context["batch"])
        for line in lines:
            print(line, file=sys.stderr)
        return code
    finally:  # under torchrun: leave the process group cleanly (gloo aborts a process exiting inside one)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if "torch" in sys.modules:  # nothing to leave if torch was never loaded (or a Ctrl-C came first)
            try:
                from nestar_lab.run.distributed import shutdown

                shutdown()
            except KeyboardInterrupt:
                pass


def _warn_plugin_problems() -> None:
    """One warning line per plugin package that failed to load (once a config did not need it)."""
    from nestar_lab.config.registry import get_registry

    get_registry().warn_problems(sys.stderr)


def _interrupted(exc: BaseException) -> int:
    """Print the resume hint; 130 for SIGINT (or a requested stop), 143 for SIGTERM."""
    print(str(exc), file=sys.stderr)
    return exit_code_for_signal(getattr(exc, "signum", None))


def _cfg_from(path: str, overrides: list[str]):
    from nestar_lab.config.overrides import apply_overrides, read_yaml
    from nestar_lab.config.validation import validate_config

    cfg = validate_config(apply_overrides(read_yaml(path), overrides))
    _warn_plugin_problems()
    return cfg


def _run_cfg(run_dir: str, overrides: list[str]):
    from nestar_lab.run.rundir import CONFIG, load_run_config

    if not overrides:
        cfg = load_run_config(run_dir)
        _warn_plugin_problems()
        return cfg
    load_run_config(run_dir)  # a clear error if this is not a run
    return _cfg_from(str(Path(run_dir) / CONFIG), overrides)


def cmd_train(args) -> int:
    from nestar_lab.run.runbook import TrainingFailed
    from nestar_lab.run.train import TrainingInterrupted, train

    if bool(args.config) == bool(args.resume):
        print("error: give either CONFIG or --resume RUN_DIR", file=sys.stderr)
        return 2
    if args.resume and args.overwrite:
        print("error: give either --resume RUN_DIR or --overwrite, not both", file=sys.stderr)
        return 2
    if args.distributed:
        return _relaunch_with_torchrun(args)
    cfg = _run_cfg(args.resume, args.overrides) if args.resume else _cfg_from(args.config, args.overrides)
    _context["batch"] = f"train.batch_size={cfg.train.batch_size}"
    try:
        if args.resume:
            result = train(cfg, args.resume, resume=True, overrides=args.overrides)
        else:
            result = train(cfg, args.run_dir, overwrite=args.overwrite)
    except TrainingInterrupted as exc:
        return _interrupted(exc)
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    from nestar_lab.run.distributed import current

    if result.already_finished:
        if current().is_main:
            print(f"{result.run_dir}: already finished ({result.steps} steps); nothing to do")
        return 0
    if current().is_main:
        print(f"trained {result.steps} steps in {result.seconds:.0f}s ({result.step_ms_median:.0f} ms/step): {result.run_dir}")
    return 0


def _relaunch_with_torchrun(args) -> int:
    """``nestar train --distributed N``: the same command under torchrun with N processes."""
    import subprocess

    from nestar_lab.run.distributed import launched_by_torchrun, torchrun_command

    if launched_by_torchrun():
        print("error: --distributed N is for launching; under torchrun give the plain command", file=sys.stderr)
        return 2
    if args.config:  # validate before starting N processes
        _cfg_from(args.config, args.overrides)
    return subprocess.call(torchrun_command(args.argv, args.distributed))


def cmd_cache_latents(args) -> int:
    from nestar_lab.run.experiment import build_experiment
    from nestar_lab.run.latent_cache import build_cache

    cfg = _cfg_from(args.config, args.overrides)
    root = build_cache(build_experiment(cfg), progress=sys.stderr.isatty())
    print(f"latent cache ready: {root} (train with data.latent_cache={root})")
    return 0


def cmd_run(args) -> int:
    from nestar_lab.run.runbook import TrainingFailed
    from nestar_lab.run.train import TrainingInterrupted, load_trained, train

    cfg = _cfg_from(args.config, args.overrides)
    _context["batch"] = f"train.batch_size={cfg.train.batch_size}"
    try:
        result = train(cfg, args.run_dir, overwrite=args.overwrite)
    except TrainingInterrupted as exc:
        return _interrupted(exc)
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"trained {result.steps} steps in {result.seconds:.0f}s ({result.step_ms_median:.0f} ms/step)")
    _context["batch"] = f"sample.batch_size={cfg.sample.batch_size}"
    return _evaluate_and_print(load_trained(result.run_dir), result.run_dir)


def cmd_eval(args) -> int:
    from nestar_lab.run.train import load_trained

    cfg = _run_cfg(args.run_dir, args.overrides)
    _context["batch"] = f"sample.batch_size={cfg.sample.batch_size}"
    return _evaluate_and_print(load_trained(args.run_dir, cfg=cfg), args.run_dir)


def _evaluate_and_print(exp, run_dir) -> int:
    from nestar_lab.run.distributed import current
    from nestar_lab.run.evaluate import evaluate

    row = evaluate(exp, run_dir)
    if not current().is_main:
        return 0
    print(json.dumps(row, indent=2))
    print(f"metrics: {Path(run_dir) / 'metrics.json'}   samples: {Path(run_dir) / 'samples.png'}")
    return 0


def cmd_sample(args) -> int:
    from nestar_lab.run.evaluate import image_path, make_sampler, save_grid

    out = image_path(args.out, Path(args.run_dir) / "grid.png")  # before any work
    import torch

    from nestar_lab.run.train import load_trained

    cfg = _run_cfg(args.run_dir, args.overrides)
    _context["batch"] = f"sample.batch_size={cfg.sample.batch_size}"
    exp = load_trained(args.run_dir, cfg=cfg)
    classes = exp.dataset.num_classes
    per_class = max(1, args.num // classes)
    if per_class * classes != args.num:  # one row per class: say what is written instead
        print(f"--num {args.num}: {classes} classes, one row each, so {per_class * classes} images "
              f"({per_class} per class)", file=sys.stderr)  # fmt: skip
    labels = torch.arange(classes).repeat_interleave(per_class)
    sampler = make_sampler(exp)
    print(sampler.path, file=sys.stderr)
    samples = sampler(labels, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(samples, out, per_class=per_class)
    st = samples.stats
    print(
        f"{st.num_images} images in {st.seconds:.2f}s ({st.num_images / st.seconds:.1f} img/s), "
        f"{st.sequential_steps} sequential steps, {st.nfe_per_image:g} NFE/image: {out}"
    )
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_table(args) -> int:
    from nestar_lab.run import results

    if not Path(args.results_dir).is_dir():
        raise FileNotFoundError(2, "no such directory (--results-dir: a results store, e.g. runs)", args.results_dir)
    df = results.load(args.results_dir)
    if df.empty:
        print(f"no results yet in {results.results_path(args.results_dir)}", file=sys.stderr)
        return 1
    by, metrics = _split(args.by), _split(args.metrics)
    if args.reference is None:
        out, markdown = results.table(df, args.where, by, metrics), results.to_markdown
    else:  # paired over seeds against the reference group
        from nestar_lab.sweep import compare

        out, markdown = compare.compare(df, args.where, by, args.reference, metrics), compare.to_markdown
    print(markdown(out) if args.format == "markdown" else out.to_csv(index=False), end="\n")
    return 0


def cmd_plot(args) -> int:
    from nestar_lab.run import results
    from nestar_lab.sweep.plots import plot_tradeoff

    df = results.select(results.load(args.results_dir), args.where)
    x, y = results.resolve_column(df, args.x), results.resolve_column(df, args.y)
    print(f"wrote {plot_tradeoff(df, x, y, args.out)}")
    return 0


def cmd_study(args) -> int:
    from nestar_lab.run.results import to_markdown
    from nestar_lab.sweep.study import load_study
    from nestar_lab.sweep.study_report import report
    from nestar_lab.sweep.tuning import invalid_trials, run_study

    spec = load_study(args.study)
    if args.study_command == "run":
        _warn_plugin_problems()  # loads the plugins now: a broken package is one warning before the trials
        from nestar_lab.sweep.bracket_search import search_brackets

        study = run_study(spec, args.trials, args.timeout, args.storage, args.workers, progress=sys.stderr.isatty(),
                          estimate=True, dry_run=args.dry_run, prepare=search_brackets)  # fmt: skip
        if study is None or os.environ.get("NESTAR_STUDY_WORKER"):  # --dry-run, or a worker: its parent sums up
            return 0
        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state.name for t in trials)
        print(f"study {spec.name}: {len(trials)} trials {dict(sorted(counts.items()))}; report: nestar study report {args.study}")
        problem = invalid_trials(trials)
        if problem:  # combinations of searched values that no config allows: the study file needs a change
            print(f"error: {problem}", file=sys.stderr)
            return 2
        return 0
    from nestar_lab.sweep.storage import check_storage, existing_study

    if args.storage:
        check_storage(args.storage)
    if existing_study(spec, args.storage) is None:  # read without creating the study or its directory
        print(f"study {spec.name}: nothing to report yet (no such study in "
              f"{args.storage or spec.study_dir / 'study.db'}); run: nestar study run {args.study}", file=sys.stderr)
        return 1
    out = report(spec, args.storage)
    for t in out.best:
        print(f"best trial {t.number}: values {t.values} params {t.params} run {t.user_attrs.get('run_id')}")
    print(to_markdown(out.table))
    if out.paired is not None:
        print(out.paired)
    print(f"table and plots in {out.out_dir}: {', '.join(p.name for p in out.plots) or 'no plots'}")
    return 0


def cmd_describe(args) -> int:
    from nestar_lab.run.experiment import build_experiment

    cfg = _cfg_from(args.config, args.overrides)
    exp = build_experiment(cfg.model_copy(update={"device": "cpu"}))
    gen, n = exp.generator, exp.order.num_tokens
    print(f"{cfg.name}: {n} tokens of dim {exp.tokenizer.latent_shape[0]} on a "
          f"{exp.order.grid[0]}x{exp.order.grid[1]} grid ({cfg.tokenizer.name}, {cfg.token_order.name} order)")  # fmt: skip
    print(f"generator {cfg.generator.name}: {len(gen.schedule.stages)} modules, "
          f"{gen.schedule.sequential_steps} sequential steps")  # fmt: skip
    for i, stage in enumerate(gen.schedule.stages):  # each module's size, solver and guidance (modules:)
        shared = " (shared weights)" if len(gen.nets) == 1 and len(gen.schedule.stages) > 1 else ""
        count = sum(p.numel() for p in gen.net(i).parameters())
        size = f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"
        solver = exp.solvers[i]
        knobs = ", ".join(f"{k} {v}" for k, v in solver.params.model_dump().items())
        solve = f"solver {cfg.module_part('ode_solver', i).name} ({knobs}), cfg {cfg.module_sample(i).cfg_scale:g}"
        print(f"  module {i + 1}: {stage.num_rows} tokens in {stage.num_steps} steps, {size} parameters{shared}; {solve}")
    total = sum(p.numel() for p in gen.parameters())
    print(f"total: {total / 1e6:.1f}M trainable parameters (tokenizer not counted)")
    return 0


def cmd_ref_stats(args) -> int:
    """The config's ``fidelity`` metric (looked up through the registry) writes the file."""
    from nestar_lab.config.parts import make
    from nestar_lab.run.evaluate import cache_root
    from nestar_lab.run.experiment import pick_device

    cfg = _cfg_from(args.config, args.overrides)
    specs = [m for m in cfg.metrics if m.name == "fidelity"]
    if not specs:
        print(f"error: {args.config}: no fidelity metric; ref-stats uses its extractor (add one to metrics)", file=sys.stderr)
        return 2
    spec = specs[0].model_copy(update={"params": {**specs[0].params, "reference": args.split}})
    metric = make("metric", spec)
    dataset = make("dataset", cfg.dataset)
    print(metric.write_reference(dataset, cfg.dataset.name, args.split, args.out, pick_device(cfg.device), cache_root()))
    return 0


def cmd_plugins(args) -> int:
    from nestar_lab.config.registry import get_registry

    registry = get_registry()
    registry.warn_problems(sys.stderr)
    infos = registry.all()
    w_kind = max(len(i.kind) for i in infos)
    w_name = max(len(i.name) for i in infos)
    for info in infos:
        print(f"{info.kind:<{w_kind}}  {info.name:<{w_name}}  {info.provider}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "cache-latents": cmd_cache_latents,
    "run": cmd_run,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "table": cmd_table,
    "plot": cmd_plot,
    "study": cmd_study,
    "describe": cmd_describe,
    "ref-stats": cmd_ref_stats,
    "plugins": cmd_plugins,
}

if __name__ == "__main__":
    sys.exit(main())
