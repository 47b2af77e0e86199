"""Quality of every generator variant after the same training budget on the digits.

Each variant (matched parameter count, see ``variants.py``) is trained with the quickstart's
budget and evaluated with the quickstart's metrics through the library (``nestar run``'s code
path); rows go to ``runs/bench_quality/results.csv`` and a markdown table into
docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_quality.py [--steps 600] [--samples-per-class 50] [--variants "NestAR k=4,AR,MAR,DiT,VAR"]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from nestar_lab import results
from nestar_lab.config import load_config
from nestar_lab.evaluate import evaluate
from nestar_lab.train import load_trained, train
from variants import CONFIG, plans, write_section

OUT = "runs/bench_quality"
METRICS = [
    "fid_digits_cnn", "class_accuracy", "precision_digits_cnn", "recall_digits_cnn",
    "diversity_ratio_digits_cnn", "sequential_steps", "nfe_per_image", "sec_per_image", "num_parameters",
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--samples-per-class", type=int, default=50)
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--variants", default="", help='comma-separated labels, or their part before " (" (default: all)')
    args = ap.parse_args()
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    for label, overrides in plans().items():
        if wanted and not any(label == w or label.startswith(w + " (") for w in wanted):
            continue
        slug = label.split(" (")[0].replace(" ", "_").replace(",", "").replace("=", "")
        cfg = load_config(CONFIG, overrides + [
            f"train.steps={args.steps}", f"eval.samples_per_class={args.samples_per_class}",
            f"output_dir={OUT}", f"name={slug}",
        ])  # fmt: skip
        run_dir = Path(OUT) / slug
        train(cfg, run_dir, progress=False)
        row = evaluate(load_trained(run_dir), run_dir)
        print(label, {k: row.get(k) for k in METRICS}, flush=True)
    df = results.load(OUT).drop_duplicates("run_id", keep="last")
    df = df[df["train.steps"] == args.steps]
    table = df[["run_id", *[m for m in METRICS if m in df.columns]]]
    cpu = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    body = (f"Device: {device}; {args.steps} training steps each; {args.samples_per_class} samples per class.\n\n"
            + results.to_markdown(table))  # fmt: skip
    print(body)
    write_section(Path(args.out), "quality", body)


if __name__ == "__main__":
    main()
