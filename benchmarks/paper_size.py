"""Paper-size speed rows: NestAR-B/-L (studies/configs/imagenet256) against MAR and DiT at the same
parameter count, on n = 256 tokens of dim 16 (the KL-16 latent of a 256 px image), 1000 classes,
random weights. Neither the tokenizer nor the dataset is built (both need the user's files): the
generator is built from the config through the registry, as ``build_experiment`` builds it, and
sampled by the library's ``Sampler`` with the identity ``pixels`` tokenizer on the 16x16x16 grid.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flops import sampling_costs
from variants import closest_width

from nestar_lab.config.overrides import apply_overrides, read_yaml
from nestar_lab.config.parts import make
from nestar_lab.config.registry import get_registry
from nestar_lab.config.schema import ExperimentConfig
from nestar_lab.interfaces import ScaleModuleSpec
from nestar_lab.method import capture
from nestar_lab.method.sample import Sampler, SamplingPlan
from nestar_lab.run.experiment import autocast_factory, module_factory, pick_device, use_bf16

CONFIGS = {"NestAR-B": "nestar_b.yaml", "NestAR-L": "nestar_l.yaml"}  # in studies/configs/imagenet256
LATENT = (16, 16, 16)  # KL-16 at 256 px: 16 channels on a 16x16 grid -> n = 256 tokens of dim 16
NUM_CLASSES = 1000
HEAD_DIM = 64  # matched widths are multiples of 64 with width / 64 heads, as NestAR-B/-L's modules
BASELINES = {  # label -> overrides on the NestAR config; MAR at its default S = 64, DiT at 50 steps
    "MAR (S=64)": ["generator.name=mar", "generator.params={steps: 64}", "token_order.name=raster"],
    "DiT (50 steps)": ["generator.name=dit", "generator.params={}", "ode_solver.params.steps=50"],
}  # fmt: skip
BASES = tuple(BASELINES)
MATCHES = {
    "total": "matched on total parameters: the baselines' widths (and head widths, width / 64 heads) "
             "chosen closest to {model}'s count",
    "per_step": "matched on the per-step network: every variant runs {model}'s scale module "
                "(each NestAR module as wide and deep as a baseline's network)",
}  # fmt: skip


def load(model: str, overrides: list[str]) -> ExperimentConfig:
    """The model's config with ``overrides``, validated only as far as its parts are built here
    (``load_config`` would also build the kl16 tokenizer and the ImageNet folder)."""
    path = Path(__file__).resolve().parents[1] / "studies/configs/imagenet256" / CONFIGS[model]
    return ExperimentConfig.model_validate(apply_overrides(read_yaml(path), overrides))


def build_generator(cfg: ExperimentConfig, meta: bool = False):
    """The config's generator and token order on the 16x16 grid (``build_experiment``'s steps).
    ``meta``: networks with shapes only (no memory, no init), to count parameters fast."""
    order = make("token_order", cfg.token_order, grid=LATENT[1:])
    gen_cls = get_registry().get("generator", cfg.generator.name)
    gen_params = cfg.generator.params_for(gen_cls)
    schedule = gen_cls.build_schedule(gen_params, order.num_tokens)
    spec = ScaleModuleSpec(LATENT[0], NUM_CLASSES, order.coords, order.grid, len(schedule.stages))
    torch.manual_seed(cfg.seed)
    make_module = module_factory(cfg, spec)  # modules: entries size their module
    if meta:

        class OnMeta(gen_cls):  # the schedule is built as usual, only the networks go to "meta"
            def build_nets(self, make_module, count):
                with torch.device("meta"):
                    return super().build_nets(make_module, count)

        gen_cls = OnMeta
    return gen_cls(gen_params, num_tokens=order.num_tokens, make_module=make_module), order


def count_params(cfg: ExperimentConfig) -> int:
    gen, _ = build_generator(cfg, meta=True)
    return sum(p.numel() for p in gen.parameters())


def with_width(overrides: list[str], width: int) -> list[str]:
    return overrides + [f"scale_module.params.width={width}", f"scale_module.params.head_width={width}",
                        f"scale_module.params.heads={width // HEAD_DIM}"]  # fmt: skip


def plans(model: str, match: str, width_scale: float = 1.0) -> dict[str, list[str]]:
    """label -> overrides on ``model``'s config. ``total``: baselines' widths matched to the
    model's parameter count; ``per_step``: the model's scale module as it is. ``width_scale``
    shrinks every width (smoke runs on a CPU only; the table says so)."""
    base = load(model, []).scale_module.params
    width = max(HEAD_DIM, round(base["width"] * width_scale / HEAD_DIM) * HEAD_DIM)
    own = with_width([], width) if width_scale != 1.0 else []
    table = {f"{model} (k=4)": own, **{label: own + ov for label, ov in BASELINES.items()}}
    if match == "per_step":
        return table
    target = count_params(load(model, own))
    widths = range(HEAD_DIM, 64 * HEAD_DIM + 1, HEAD_DIM)
    for label in BASELINES:
        w = closest_width(lambda w: count_params(load(model, with_width(table[label], w))), target, widths)
        table[label] = with_width(table[label], w)
    return table


def setting(model: str) -> str:
    """The caption's first sentence: what the paper-size rows share, read from the config."""
    cfg = load(model, [])
    solver, sample = cfg.ode_solver, cfg.sample
    return (f"Paper size, random weights: n = 256 tokens of dim 16 (the 16x16 KL-16 latent grid of a 256 px image), "
            f"{NUM_CLASSES} classes; the configs' solver ({solver.name}, {solver.params.get('steps', '?')} steps; "
            f"DiT 50) and guidance (CFG {sample.cfg_scale:g}, {sample.cfg_schedule} schedule); sampling only.")  # fmt: skip


def measure(model: str, overrides: list[str], args, log, flops_per_image: float | None = None) -> dict:
    """Sampling costs of one paper-size variant (no training): params, FLOPs, passes, img/s."""
    cfg = load(model, overrides + [f"train.precision={args.precision or 'auto'}"])
    device = pick_device(args.device)
    gen, order = build_generator(cfg)
    gen = gen.to(device).eval()
    tokenizer = get_registry().get("tokenizer", "pixels")(image_shape=LATENT)  # identity on the latent grid
    stages = range(len(gen.schedule.stages))  # each module's solver and guidance (modules:)
    solvers = [make("ode_solver", cfg.module_part("ode_solver", i)) for i in stages]
    def make_sampler(capture: str) -> Sampler:
        sample_cfgs = [cfg.module_sample(i).model_copy(update={"capture": capture}) for i in stages]
        plan = SamplingPlan.build(solvers, sample_cfgs, device, autocast_factory(device, cfg.train.precision))
        return Sampler(gen, tokenizer, order, plan)

    sampler, eager = make_sampler(args.capture_mode), make_sampler("off")
    labels = torch.arange(args.images) % NUM_CLASSES
    params = sum(p.numel() for p in gen.parameters())
    sm = cfg.scale_module.params
    log(f"{params / 1e6:.1f}M params (width {sm['width']}, depth {sm['depth']}, heads {sm['heads']}); "
        f"{args.images} image(s) per call: one FLOP-counted call, then {args.repeats} timed")  # fmt: skip
    t0 = time.perf_counter()
    row = {"params": params, "device": device, "bf16": use_bf16(device, cfg.train.precision), "width": sm["width"]}
    graphs_before = capture.graph_memory_bytes()
    row.update(sampling_costs(lambda: sampler(labels, seed=0), args.images, args.repeats, device,
                              counted=lambda: eager(labels, seed=0), warmup=2 if sampler.captured else 0,
                              flops_per_image=flops_per_image))  # fmt: skip
    row.update(captured=sampler.captured, graph_mb=(capture.graph_memory_bytes() - graphs_before) / 2**20)
    log(f"done in {time.perf_counter() - t0:.0f} s: {row['flops_per_image'] / 1e9:,.1f} GFLOP/image, "
        f"{row['img_per_s']:.3g} img/s, {row['passes']:g} sequential passes")  # fmt: skip
    del gen, sampler, eager
    capture.clear()  # the next variant records its own graphs; these are freed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row
