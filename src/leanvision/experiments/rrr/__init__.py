"""RRR-Net procedures: reducing a pretrained ResNet, selecting its blocks, training its branches, and the
paper's four-method comparison."""

from leanvision.experiments.rrr.run import METHODS, RunConfig, run_methods
from leanvision.experiments.rrr.select import SelectConfig, block_sequence, select_blocks
from leanvision.experiments.rrr.train import BranchTrainer, fit_rrr, reduce_checkpoint

__all__ = [
    "METHODS",
    "BranchTrainer",
    "RunConfig",
    "SelectConfig",
    "block_sequence",
    "fit_rrr",
    "reduce_checkpoint",
    "run_methods",
    "select_blocks",
]
