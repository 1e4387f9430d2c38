"""Face detection around the RNNPool-Face detectors (models in leanvision.models.face): datasets and S3FD
augmentation (data, augment, synthetic_faces), detection on images of any size (inference), the Haar
baseline (haar), WIDER FACE AP (evaluation) and training on the engine (task)."""

from leanvision.detection.evaluation import few_faces_subsets, size_subsets, subsets_from_targets, wider_ap

__all__ = ["few_faces_subsets", "size_subsets", "subsets_from_targets", "wider_ap"]
