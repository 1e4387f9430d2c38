"""Building blocks shared by the models."""

from leanvision.layers.classifier import ClassifierHead
from leanvision.layers.conv import ConvNormAct
from leanvision.layers.inverted_residual import LinearBottleneck
from leanvision.layers.squeeze_excite import SqueezeExcite

__all__ = ["ClassifierHead", "ConvNormAct", "LinearBottleneck", "SqueezeExcite"]
