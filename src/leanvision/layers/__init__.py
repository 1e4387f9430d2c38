"""Building blocks shared by the models."""

from leanvision.layers.classifier import ClassifierHead, create_classifier
from leanvision.layers.conv import ConvNormAct
from leanvision.layers.image_normalize import ImageNormalize
from leanvision.layers.inverted_residual import LinearBottleneck
from leanvision.layers.renet import ReNetLayer
from leanvision.layers.rnn_cells import FastGRNNCell, GRUCell, LSTMCell, create_cell
from leanvision.layers.rnnpool import RNNPool, RNNPoolLayer
from leanvision.layers.squeeze_excite import SqueezeExcite

__all__ = [
    "ClassifierHead",
    "ConvNormAct",
    "FastGRNNCell",
    "GRUCell",
    "ImageNormalize",
    "LSTMCell",
    "LinearBottleneck",
    "RNNPool",
    "RNNPoolLayer",
    "ReNetLayer",
    "SqueezeExcite",
    "create_cell",
    "create_classifier",
]
