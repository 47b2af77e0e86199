"""The generator variants the benchmarks compare, at a matched parameter count."""

from __future__ import annotations

from pathlib import Path

from nestar_lab.config import load_config

CONFIG = "studies/configs/quickstart.yaml"
VARIANTS = {  # label -> overrides on the quickstart config; widths of the others matched below
    "NestAR k=4 (M=3)": ["generator.params.k=4"],
    "NestAR k=8 (M=2)": ["generator.params.k=8"],
    "NestAR k=4, joint head": ["generator.params.k=4", "scale_module.params.head=joint"],
    "AR (raster)": ["generator.name=ar", "generator.params={}", "token_order.name=raster"],
    "MAR (S=16)": [
        "generator.name=mar", "generator.params={steps: 16}", "token_order.name=raster",
        "sample.cfg_schedule=linear", "coordination.name=none", "coordination.params={}",
    ],
    "DiT (joint head, 50 steps)": [
        "generator.name=dit", "generator.params={}", "scale_module.params.head=joint",
        "ode_solver.params.steps=50",
    ],
    "VAR (1,2,4,8)": ["generator.name=var", "generator.params={}", "coordination.name=none", "coordination.params={}"],
}  # fmt: skip
BASELINES = ("MAR (S=16)", "DiT (joint head, 50 steps)", "AR (raster)")
MATCH_TO = "NestAR k=4 (M=3)"


def count_params(overrides: list[str]) -> int:
    from nestar_lab.experiment import build_experiment

    cfg = load_config(CONFIG, overrides + ["device=cpu"])
    return sum(p.numel() for p in build_experiment(cfg).generator.parameters())


def matched(overrides: list[str], target: int) -> list[str]:
    """Overrides plus the width (transformer and head, multiples of 8) closest to ``target`` params."""
    best = None
    for width in range(32, 321, 8):
        ov = overrides + [f"scale_module.params.width={width}", f"scale_module.params.head_width={width}"]
        n = count_params(ov)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (ov, n)
        if n > target:
            break
    return best[0]


def plans() -> dict[str, list[str]]:
    """Every variant's overrides, widths matched to ``MATCH_TO``'s parameter count."""
    target = count_params(VARIANTS[MATCH_TO])
    return {label: (ov if label == MATCH_TO else matched(ov, target)) for label, ov in VARIANTS.items()}


def write_section(path: Path, key: str, body: str) -> None:
    """Replace the text between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path``."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]
    else:
        text += f"\n{start}\n{body}\n{end}\n"
    path.write_text(text)
