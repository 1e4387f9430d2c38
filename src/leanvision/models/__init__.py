"""Model definitions; importing this package registers every model name."""

from leanvision.models import face, mobilenet, rcnn, rexnet, rnnpool_nets, rrrnet, ssdlite  # noqa: F401
from leanvision.models.base import Classifier, ClassifierBase, FeatureExtractor, TorchvisionClassifier

__all__ = ["Classifier", "ClassifierBase", "FeatureExtractor", "TorchvisionClassifier"]
