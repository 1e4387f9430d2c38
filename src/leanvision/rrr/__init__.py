"""RRR-Net procedures: reducing a pretrained ResNet and training an RRR-Net's branches."""

from leanvision.rrr.train import BranchTrainer, fit_rrr, reduce_checkpoint

__all__ = ["BranchTrainer", "fit_rrr", "reduce_checkpoint"]
