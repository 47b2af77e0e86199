"""What the CPU can check of GPU speed (DESIGN.md 4e): a plain training step reads nothing from
the device, deferred reads change nothing, the static patch solve equals eager and traces as one
graph for every generator and fixed-step solver, and the KV cache is written in place."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from nestar_lab.config.validation import validate_config
from nestar_lab.method import capture
from nestar_lab.method.sample import SamplingPlan
from nestar_lab.run.experiment import build_experiment
from nestar_lab.run.optim import make_optimizer
from nestar_lab.run.train import train, train_step

ROOT = Path(__file__).resolve().parents[1]
PROJECT = (str(ROOT / "nestar_lab"), str(ROOT / "plugins"))
CONVERSIONS = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist")
FIXED = ("euler", "midpoint", "heun", "rk4")
GENERATORS = {  # generator spec and scale-module overrides that let it run on the tiny digits
    "nestar": ({"name": "nestar", "params": {"k": 4}}, {}),
    "ar": ({"name": "ar"}, {}),
    "mar": ({"name": "mar", "params": {"steps": 4}}, {}),
    "var": ({"name": "var"}, {"head": "joint"}),
    "dit": ({"name": "dit"}, {}),
}


class ProjectConversions:
    """Tensor -> Python conversions made by the project's own code (torch's internals, such as
    torch.optim's CPU step counters, are left out: only a caller in nestar_lab/ or plugins/ counts)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in CONVERSIONS:
            original = getattr(torch.Tensor, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(PROJECT):
                    self.calls.append(f"{_name} in {Path(caller).name}:{sys._getframe(1).f_lineno}")
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_a_plain_training_step_reads_nothing_from_the_device(tiny_raw, monkeypatch):
    tiny_raw["train"]["log_every"] = 10  # step 3 is a plain step: no disagreement measured, nothing logged
    exp = build_experiment(validate_config(tiny_raw))
    opt, ema = make_optimizer(exp)
    split = exp.dataset.split("train")
    tokens = exp.order.flatten(exp.tokenizer.encode(split.images[:16]))
    train_step(exp, opt, ema, tokens, split.labels[:16], 0)  # warm-up: lazily built rows
    with monkeypatch.context() as m:
        seen = ProjectConversions(m)
        out, nonfinite = train_step(exp, opt, ema, tokens, split.labels[:16], 3)
    assert seen.calls == [], seen.calls
    assert nonfinite.shape == () and not bool(nonfinite) and torch.isfinite(out.total)


def _nan_from(monkeypatch, calls: set[int]):
    import nestar_lab.run.train as train_mod
    from nestar_lab.method.losses import LossOutput

    real_build = train_mod.build_experiment

    def build(cfg):
        exp = real_build(cfg)
        forward, count = exp.generator.forward, [0]

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            i, count[0] = count[0], count[0] + 1
            return LossOutput(total=out.total * float("nan"), parts=out.parts) if i in calls else out

        exp.generator.forward = poisoned
        return exp

    monkeypatch.setattr(train_mod, "build_experiment", build)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_reading_the_device_late_changes_nothing(tiny_raw, tmp_path, monkeypatch):
    """Skips decided on the device and read every 5 steps give the weights and the skipped-step
    log lines of a run that reads every step."""
    tiny_raw["train"].update(steps=8, checkpoint_every=8)
    _nan_from(monkeypatch, {1, 2})
    every = train(validate_config(tiny_raw), tmp_path / "every", progress=False)
    tiny_raw["train"]["log_every"] = 5
    late = train(validate_config(tiny_raw), tmp_path / "late", progress=False)
    assert every.nonfinite_skipped == late.nonfinite_skipped == 2
    a, b = (torch.load(r.run_dir / "checkpoint.pt", weights_only=True) for r in (every, late))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert [r["step"] for r in _rows(late.run_dir)] == [2, 3, 5, 8]  # skipped steps, then every 5th and the last
    assert [r.get("skipped", False) for r in _rows(late.run_dir)] == [True, True, False, False]


def test_a_streak_found_late_fails_at_the_step_it_reached_the_limit(tiny_raw, tmp_path, monkeypatch):
    """Between reads the device freezes training once the streak is at its limit: the failure
    names the step where it got there, and the log stops at that step."""
    from nestar_lab.run.runbook import TrainingFailed

    tiny_raw["train"].update(steps=20, checkpoint_every=20, log_every=20, max_nonfinite_steps=3)
    _nan_from(monkeypatch, {4, 5, 6})  # steps 5, 6, 7; step 8 on would be finite
    with pytest.raises(TrainingFailed, match="failed at step 7: .* 3 steps in a row") as info:
        train(validate_config(tiny_raw), tmp_path / "run", progress=False)
    assert info.value.step == 7
    assert [r["step"] for r in _rows(tmp_path / "run")] == [5, 6, 7]


# ------------------------------------------------------------------ the static patch solve


def _experiment(tiny_raw, generator: str, solver: str = "euler", steps: int = 2):
    spec, module = GENERATORS[generator]
    tiny_raw["generator"] = spec
    tiny_raw["scale_module"]["params"].update(module)
    tiny_raw["ode_solver"] = {"name": solver, "params": {"steps": steps}}
    exp = build_experiment(validate_config(tiny_raw))
    return exp, exp.generator.eval()


def _sample(exp, capture_mode):
    force = capture_mode if isinstance(capture_mode, bool) else None  # True: the static path, even on the CPU
    mode = "auto" if force is not None else capture_mode
    cfgs = [c.model_copy(update={"capture": mode}) for c in exp.sample_configs()]
    plan = SamplingPlan.build(exp.solvers, cfgs, exp.device, exp.autocast(), capture=force)
    rng = torch.Generator(device=exp.device).manual_seed(5)
    labels = torch.tensor([0, 3, 7], device=exp.device)
    return exp.generator.sample_tokens(labels, plan, rng, exp.tokenizer.latent_shape[0])


@pytest.mark.parametrize("generator", sorted(GENERATORS))
def test_the_static_solve_equals_eager_for_every_generator(generator, tiny_raw):
    exp, gen = _experiment(tiny_raw, generator)
    eager, static = _sample(exp, "off"), _sample(exp, True)
    torch.testing.assert_close(static.tokens, eager.tokens, rtol=0, atol=0)
    assert static.nfe == eager.nfe and static.nfe_per_module == eager.nfe_per_module
    kept = {id(s) for net in gen.nets for s in capture.captured(net)}
    assert kept, "the static path kept no solve"
    again = _sample(exp, True)  # the kept buffers are reused, with this call's inputs
    torch.testing.assert_close(again.tokens, eager.tokens, rtol=0, atol=0)
    assert {id(s) for net in gen.nets for s in capture.captured(net)} == kept


@pytest.mark.parametrize("solver", FIXED)
@pytest.mark.parametrize("generator", sorted(GENERATORS))
def test_the_captured_function_is_one_graph(generator, solver, tiny_raw):
    """What a CUDA graph records must trace with no graph break (fullgraph=True would compile it)."""
    import torch._dynamo as dynamo

    exp, gen = _experiment(tiny_raw, generator, solver, steps=1)
    _sample(exp, True)
    solves = {id(s): s for net in gen.nets for s in capture.captured(net)}
    assert solves
    for solve in solves.values():
        dynamo.reset()
        explained = dynamo.explain(solve.solve)()
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    dynamo.reset()


def test_nfe_comes_from_the_solver_not_a_counter():
    from nestar_plugins.ode_solvers.torchdiffeq_solvers import RK4, Dopri5

    calls = []
    result = RK4(RK4.Params(steps=3)).integrate(lambda t, y: calls.append(1) or -y, torch.ones(2))
    assert result.nfe == RK4(RK4.Params(steps=3)).evaluations() == 12 == len(calls)
    adaptive = Dopri5().integrate(lambda t, y: -y, torch.ones(2))
    assert Dopri5().evaluations() is None and adaptive.nfe > 0  # counted as it ran


def test_capture_decisions_and_their_reasons():
    from nestar_plugins.ode_solvers.torchdiffeq_solvers import Dopri5, Euler

    assert capture.resolve("auto", Euler(), "cpu") is False
    assert capture.resolve("off", Euler(), "cuda") is False
    assert capture.resolve("auto", Euler(), "cuda") is True
    assert capture.resolve("auto", Dopri5(), "cuda") is False
    with pytest.raises(capture.CaptureError, match="sample.capture: on is impossible here: .*cpu.*set sample.capture"):
        capture.resolve("on", Euler(), "cpu")
    with pytest.raises(capture.CaptureError, match="adaptive"):
        capture.resolve("on", Dopri5(), "cuda")
    assert "eager (capture needs CUDA" in capture.describe("auto", [Euler()], "cpu")
    assert capture.describe("auto", [Euler()], "cuda").startswith("sampling: captured")
    assert "adaptive" in capture.describe("auto", [Euler(), Dopri5()], "cuda")


@pytest.mark.parametrize("where", ["sample.capture", "modules.2.ode_solver"])
def test_capture_on_where_impossible_is_a_config_error(where, tiny_raw):
    from nestar_lab.config.errors import ConfigError

    tiny_raw["sample"]["capture"] = "on"
    if where == "modules.2.ode_solver":
        tiny_raw["device"] = "auto"
        tiny_raw["modules"] = {2: {"ode_solver": {"name": "dopri5"}}}
    with pytest.raises(ConfigError) as info:
        validate_config(tiny_raw)
    lines = info.value.lines
    assert len(lines) == 1 and lines[0].startswith("sample.capture: on is impossible"), lines
    assert "set sample.capture: auto or off" in lines[0]


def test_the_kv_cache_is_allocated_once_and_written_in_place(tiny_raw, monkeypatch):
    exp, gen = _experiment(tiny_raw, "nestar")
    real_cat, cats = torch.cat, []

    def watched(tensors, *args, **kwargs):
        cats.append(tuple(t.dim() for t in tensors))
        return real_cat(tensors, *args, **kwargs)

    net = gen.net(1)
    cache = net.start_cache(torch.tensor([0, 1]), stage=1, capacity=12)
    buffers = [(c.k.data_ptr(), c.k.shape) for c in cache]
    assert all(shape[2] == net.params.prefix_tokens + 12 for _, shape in buffers)
    monkeypatch.setattr(torch, "cat", watched)
    from nestar_lab.interfaces import Rows

    for step in range(3):
        rows = Rows(torch.arange(4) + 4 * step, torch.arange(4) + 4 * step + 4)
        net.extend(torch.randn(2, 4, exp.tokenizer.latent_shape[0]), rows, cache)
    assert not [c for c in cats if len(c) == 2 and c[0] == 4], "the cache grew by concatenation"
    assert [(c.k.data_ptr(), c.k.shape) for c in cache] == buffers and cache[0].length == net.params.prefix_tokens + 12
    with pytest.raises(ValueError, match="KV cache holds"):
        net.extend(torch.randn(2, 1, exp.tokenizer.latent_shape[0]), Rows(torch.tensor([0]), torch.tensor([1])), cache)


# ------------------------------------------------------------------ where a GPU exists

CAPTURE_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # max |captured - eager| over tokens of unit scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_checks.sh runs this)")
@pytest.mark.parametrize("precision", sorted(CAPTURE_TOLERANCE))
@pytest.mark.parametrize("generator", sorted(GENERATORS))
def test_captured_sampling_equals_eager_on_cuda(generator, precision, tiny_raw):
    """Same seed, same images: the first captured call records the solves (the context passes run
    eagerly), the second records the context passes, the third only replays; each equals eager."""
    tiny_raw.update(device="cuda")
    tiny_raw["train"]["precision"] = precision
    exp, gen = _experiment(tiny_raw, generator)
    eager = _sample(exp, "off").tokens
    for call in range(3):
        captured = _sample(exp, "on")
        assert captured.tokens.shape == eager.shape
        diff = (captured.tokens - eager).abs().max().item()
        assert diff <= CAPTURE_TOLERANCE[precision], f"call {call}: max |captured - eager| = {diff}"
    assert capture.graph_memory_bytes() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_no_hidden_sync_on_cuda(tiny_raw):
    """What the Python-level count cannot see (a sync inside a C++ op): CUDA's sync debug mode
    raises on any synchronizing call in a plain training step and in a captured sampling call."""
    tiny_raw.update(device="cuda")
    tiny_raw["train"]["log_every"] = 10
    exp = build_experiment(validate_config(tiny_raw))
    opt, ema = make_optimizer(exp)
    split = exp.dataset.split("train")
    tokens = exp.order.flatten(exp.tokenizer.encode(split.images[:16].cuda()))
    labels = split.labels[:16].cuda()
    train_step(exp, opt, ema, tokens, labels, 0)
    exp.generator.eval()
    for _ in range(2):  # the first calls record the graphs (recording itself may synchronize)
        _sample(exp, "on")
    exp.generator.train()
    cfgs = [c.model_copy(update={"capture": "on"}) for c in exp.sample_configs()]
    plan = SamplingPlan.build(exp.solvers, cfgs, exp.device, exp.autocast())
    rng = torch.Generator(device=exp.device).manual_seed(5)
    wanted = torch.tensor([0, 3, 7], device=exp.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(exp, opt, ema, tokens, labels, 3)
        exp.generator.eval()
        exp.generator.sample_tokens(wanted, plan, rng, exp.tokenizer.latent_shape[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_running_out_of_memory_while_capturing_is_one_line(monkeypatch):
    """The GPU fills up while a solve is recorded: one line naming the batch and the way out."""
    from nestar_plugins.ode_solvers.torchdiffeq_solvers import Euler

    from nestar_lab.config.errors import describe
    from nestar_lab.method.flow import guided_velocity

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "Stream", full)
    with pytest.raises(capture.CaptureError) as info:
        capture.StaticSolve(Euler(), lambda y, t, c: y, guided_velocity, torch.zeros(12, 4, 8), torch.zeros(12, 4, 3),
                            graph=True)  # fmt: skip
    code, lines = describe(info.value)
    assert code == 1 and len(lines) == 1
    assert "batch 12" in lines[0] and "sample.batch_size" in lines[0] and "sample.capture: off" in lines[0]
