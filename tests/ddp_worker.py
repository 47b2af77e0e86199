"""Run under torchrun by tests/test_distributed.py: train, then save this rank's weights."""

import sys
from pathlib import Path

import torch

from nestar_lab.config.validation import load_config
from nestar_lab.run import distributed
from nestar_lab.run.train import train

config, run_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = load_config(config)


def save_weights(step, exp):
    if step == cfg.train.steps:
        rank = distributed.current().rank
        torch.save(exp.generator.state_dict(), out / f"rank{rank}.pt")


train(cfg, run_dir, progress=False, callbacks=[save_weights])
distributed.shutdown()
