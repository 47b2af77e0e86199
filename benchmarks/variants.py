"""The generator variants the benchmarks compare, and the two ways of matching their size.

Every variant is ``CONFIG`` plus its overrides: the quickstart as it stood when the stored tables
were run, frozen in ``benchmarks/configs/variants_base.yaml`` so that the quickstart's defaults
can change without invalidating stored runs and searches.

``total``: every baseline's width is chosen so that its parameter count is closest to NestAR
k=4's, so each of NestAR's M modules is about 1/M the size of a baseline's one network.
``per_step``: every variant runs the config's scale module as it is, so each NestAR module is as
wide and deep as a baseline's one network (NestAR then has M times the parameters) and speed
ratios show the schedule alone.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from nestar_lab.config.validation import load_config

CONFIG = "benchmarks/configs/variants_base.yaml"  # the quickstart as of 2026-12-06, frozen (see the file)
SIZES = {  # token count -> overrides on the quickstart config giving that many tokens
    64: [],  # the 8x8 digits, one pixel per token
    256: ["dataset.name=image_patches", "dataset.params={}"],  # 16x16 RGB crops: the paper's n
}
MATCH_TO = "NestAR k=4"  # every other variant's width is matched to this one's parameter count
MATCHES = {
    "total": f"matched on total parameters (every other variant's width and head width chosen closest to {MATCH_TO}'s count)",
    "per_step": "matched on the per-step network (every variant runs the same scale module; NestAR has one per module)",
}


def variants(tokens: int = 64) -> dict[str, list[str]]:
    """label -> overrides for ``tokens`` tokens. MAR takes n/4 steps (its default 64 at n = 256)."""
    side = math.isqrt(tokens)
    big_k = {64: 8, 256: 16}[tokens]
    scales = ",".join(str(2**i) for i in range(int(math.log2(side)) + 1))
    table = {
        MATCH_TO: ["generator.params.k=4"],
        f"NestAR k={big_k}": [f"generator.params.k={big_k}"],
        "NestAR k=4 joint head": ["generator.params.k=4", "scale_module.params.head=joint"],
        "AR (raster)": ["generator.name=ar", "generator.params={}", "token_order.name=raster"],
        f"MAR (S={tokens // 4})": [
            "generator.name=mar", f"generator.params={{steps: {tokens // 4}}}", "token_order.name=raster",
            "sample.cfg_schedule=linear", "coordination.name=none", "coordination.params={}",
        ],
        "DiT (50 steps)": ["generator.name=dit", "generator.params={}", "ode_solver.params.steps=50"],
        f"VAR ({scales})": ["generator.name=var", "generator.params={}", "coordination.name=none", "coordination.params={}"],
    }  # fmt: skip
    return {label: SIZES[tokens] + ov for label, ov in table.items()}


def baselines(tokens: int = 64) -> tuple[str, ...]:
    """The labels speed-ups are computed against: MAR, DiT, AR."""
    return (f"MAR (S={tokens // 4})", "DiT (50 steps)", "AR (raster)")


def count_params(overrides: list[str]) -> int:
    from nestar_lab.run.experiment import build_experiment

    cfg = load_config(CONFIG, overrides + ["device=cpu"])
    return sum(p.numel() for p in build_experiment(cfg).generator.parameters())


def closest_width(count, target: int, widths) -> int:
    """The width in ``widths`` (ascending) whose ``count(width)`` is closest to ``target``;
    a binary search, since parameter counts grow with width."""
    widths, lo = list(widths), 0
    hi = len(widths) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(widths[mid]) < target else (lo, mid)
    return min(widths[max(lo - 1, 0) : lo + 1], key=lambda w: abs(count(w) - target))


def with_width(overrides: list[str], width: int) -> list[str]:
    return overrides + [f"scale_module.params.width={width}", f"scale_module.params.head_width={width}"]


def matched(overrides: list[str], target: int) -> list[str]:
    """Overrides plus the width (transformer and head, multiples of 8) closest to ``target`` params."""
    width = closest_width(lambda w: count_params(with_width(overrides, w)), target, range(32, 321, 8))
    return with_width(overrides, width)


def plans(tokens: int = 64, match: str = "total") -> dict[str, list[str]]:
    """Every variant's overrides, matched as ``match`` says (a key of ``MATCHES``)."""
    table = variants(tokens)
    if match == "per_step":
        return table
    if match != "total":
        raise ValueError(f"match must be one of {', '.join(MATCHES)}; got {match!r}")
    target = count_params(table[MATCH_TO])
    return {label: (ov if label == MATCH_TO else matched(ov, target)) for label, ov in table.items()}


def positive(text: str) -> int:
    """An argparse type (the benchmarks' counts): an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {value}")
    return value


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


def run_main(main) -> None:
    """A benchmark's entry point: bad input (a config value, a path that is no run) ends as the
    library's one line per problem and exit code 2, as ``nestar`` does, not a traceback; so do an
    interruption (Ctrl-C, SIGTERM: the same command resumes) and a study or training that failed
    as the library reports it (an ``exit_code`` of its own). Anything else is a bug: traceback."""
    import sys

    from nestar_lab.config.errors import BadInput, describe

    try:
        main()
    except (Exception, KeyboardInterrupt) as exc:
        if not isinstance(exc, (BadInput, KeyboardInterrupt)) and not hasattr(exc, "exit_code"):
            raise
        code, lines = describe(exc)
        print("\n".join(lines), file=sys.stderr)
        sys.exit(code)
