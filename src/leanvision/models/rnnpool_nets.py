"""RNNPool versions of torchvision's EfficientNet-B0, ResNet18, DenseNet121 and GoogLeNet (RNNPool paper,
Section 4, Table 1 and Appendices E.2.2, F.1).

Each network is torchvision's class with its modules and keys; an RNNPoolLayer (Table 9 hidden sizes and
patch sizes, stride 4) replaces the early blocks that work on the largest maps, taking the 112x112 output
of the first convolution straight to 28x28:
- EfficientNet-B0: stages 1-3 (MBConv 16, 24, 40); the first MBConv 80 takes the 64 RNNPool channels;
- ResNet18: the max pool, conv2_x and conv3_x; conv4_x takes the 128 RNNPool channels as before;
- DenseNet121: P1, D1, T1 and D2 (Figure 2); T2's 1x1 conv takes the 192 RNNPool channels;
- GoogLeNet: max pool 1, conv2, conv3, max pool 2 and inceptions 3a, 3b (E.2.2 puts its peak memory at
  inception 4e, so nothing at 28x28 is left); max pool 3 then takes the 128 RNNPool channels to 14x14.
A replaced module that other code addresses by name (ResNet's layer1, GoogLeNet's conv2 ...) stays as
an Identity, so the stage names and keys of the rest are torchvision's.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.densenet import _Transition
from torchvision.models.efficientnet import MBConv, MBConvConfig
from torchvision.models.resnet import BasicBlock

from leanvision.errors import InvalidArgumentError
from leanvision.layers import RNNPool, RNNPoolLayer
from leanvision.layers.downsample import create_downsample
from leanvision.models.base import TorchvisionClassifier
from leanvision.models.registry import register_model

_googlenet = sys.modules["torchvision.models.googlenet"]  # the module, shadowed by the builder function

# EfficientNet-B0's stages as torchvision builds them: expansion, kernel, stride, in, out, blocks.
EFFICIENTNET_B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
GOOGLENET_STAGES = (
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b",
)  # fmt: skip


class EfficientNetB0RNNPool(TorchvisionClassifier, torchvision.models.EfficientNet):
    """torchvision's EfficientNet-B0 with stages 1-3 replaced by an RNNPoolLayer (32 -> 4 * hidden).

    Stochastic depth keeps B0's schedule: each remaining block drops with the probability it has in B0.
    """

    head_modules = ("avgpool", "classifier.0", "classifier.1")

    def __init__(self, num_classes: int = 1000, hidden_size: int = 16, patch_size: int = 6) -> None:
        super().__init__(
            [MBConvConfig(*stage) for stage in EFFICIENTNET_B0_STAGES], 0.2, num_classes=num_classes
        )
        first = self.features[4][0]
        config = MBConvConfig(6, 3, 2, 4 * hidden_size, first.out_channels, 1)
        self.features[4][0] = MBConv(config, first.stochastic_depth.p, nn.BatchNorm2d)
        stem = self.features[0]
        pool = RNNPoolLayer(stem.out_channels, hidden_size, hidden_size, patch_size, stride=4)
        self.features = nn.Sequential(stem, pool, *self.features[4:])
        self.num_features = self.features[-1].out_channels
        self.feature_info = [
            dict(module="features.0", num_chs=stem.out_channels, reduction=2),
            dict(module="features.1", num_chs=pool.out_channels, reduction=8),
            dict(module="features.3", num_chs=self.features[3][-1].out_channels, reduction=16),
            dict(module="features.6", num_chs=self.num_features, reduction=32),
        ]


class ResNet18RNNPool(TorchvisionClassifier, torchvision.models.ResNet):
    """torchvision's ResNet18 with max pool, conv2_x and conv3_x replaced by an RNNPoolLayer (64 -> 128)."""

    head_modules = ("avgpool", None, "fc")

    def __init__(self, num_classes: int = 1000, hidden_size: int = 32, patch_size: int = 8) -> None:
        if 4 * hidden_size != 128:
            raise InvalidArgumentError(
                "ResNet18-RNNPool feeds conv4_x, which takes 128 channels: hidden_size must be 32"
            )
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.maxpool = RNNPoolLayer(64, hidden_size, hidden_size, patch_size, stride=4)
        self.layer1, self.layer2 = nn.Identity(), nn.Identity()
        self.num_features = self.fc.in_features
        self.feature_info = [
            dict(module="relu", num_chs=64, reduction=2),
            dict(module="layer2", num_chs=4 * hidden_size, reduction=8),
            dict(module="layer3", num_chs=256, reduction=16),
            dict(module="layer4", num_chs=self.num_features, reduction=32),
        ]

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [(name, getattr(self, name)) for name in RESNET_STAGES]


class DenseNet(TorchvisionClassifier, torchvision.models.DenseNet):
    """torchvision's DenseNet with the RNNPool paper's options (all off by default: DenseNet121).

    - `downsample`: a DOWNSAMPLE_KINDS layer (4 * hidden_size channels) replaces P1, D1, T1 and D2;
    - `transition_pool="rnnpool"`: each remaining transition's 2x2 average pool becomes an RNNPoolLayer
      with patch 4, stride 2 and hidden C/4 (Appendix F.1.3);
    - `last_pool="rnnpool"`: an RNNPool over the whole last map, hidden C/4, replaces the global pool;
    - `block_config`: dense layers per block, e.g. (6, 12, 10, 6) drops 14 layers of D3 and 10 of D4.

    The ReLU torchvision's forward applies after `features.norm5` is the module `features.relu5`.
    """

    head_modules = ("global_pool", None, "classifier")

    def __init__(
        self,
        num_classes: int = 1000,
        block_config: tuple[int, int, int, int] = (6, 12, 24, 16),
        downsample: str | None = None,
        hidden_size: int = 48,
        patch_size: int = 8,
        transition_pool: str = "avg",
        last_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(32, block_config, 64, num_classes=num_classes, drop_rate=drop_rate)
        for option, value in (("transition_pool", transition_pool), ("last_pool", last_pool)):
            if value not in ("avg", "rnnpool"):
                raise InvalidArgumentError(f"{option} must be 'avg' or 'rnnpool', got {value!r}")
        blocks = OrderedDict(self.features.named_children())
        if downsample is not None:
            t2_chs = blocks["transition2"].conv.out_channels
            replaced = ("pool0", "denseblock1", "transition1", "denseblock2", "transition2")
            blocks = OrderedDict(
                [(n, m) for n, m in blocks.items() if n in ("conv0", "norm0", "relu0")]
                + [("downsample", create_downsample(downsample, 64, hidden_size, patch_size, 4, nn.ReLU))]
                + [("transition2", _Transition(4 * hidden_size, t2_chs))]
                + [(n, m) for n, m in blocks.items() if n not in replaced + ("conv0", "norm0", "relu0")]
            )
        if transition_pool == "rnnpool":
            for name, block in blocks.items():
                if name.startswith("transition"):
                    out_chs = block.conv.out_channels
                    block.pool = RNNPoolLayer(out_chs, out_chs // 4, out_chs // 4, patch_size=4, stride=2)
        blocks["relu5"] = nn.ReLU(inplace=True)
        self.features = nn.Sequential(blocks)
        self.num_features = self.classifier.in_features
        self.global_pool = (
            nn.AdaptiveAvgPool2d(1)
            if last_pool == "avg"
            else RNNPool(self.num_features, self.num_features // 4, self.num_features // 4)
        )
        # a level is the input of each transition (which halves the map), then the last map
        names, reduction = list(blocks), 4 if downsample is None else 8
        self.feature_info = [dict(module="features.relu0", num_chs=64, reduction=2)]
        for i, (name, block) in enumerate(blocks.items()):
            if name.startswith("transition"):
                self.feature_info.append(
                    dict(
                        module=f"features.{names[i - 1]}",
                        num_chs=block.norm.num_features,
                        reduction=reduction,
                    )
                )
                reduction *= 2
        self.feature_info.append(
            dict(module="features.relu5", num_chs=self.num_features, reduction=reduction)
        )


class GoogLeNetRNNPool(TorchvisionClassifier, torchvision.models.GoogLeNet):
    """torchvision's GoogLeNet (auxiliary classifiers included, as the paper counts them) with everything
    from max pool 1 to inception 3b replaced by an RNNPoolLayer (64 -> 4 * hidden channels).

    In training mode with `aux_logits`, `forward` returns torchvision's GoogLeNetOutputs (logits and the
    two auxiliary logits); otherwise the logits, forward_head(forward_features(x)).
    """

    head_modules = ("avgpool", "dropout", "fc")

    def __init__(
        self, num_classes: int = 1000, hidden_size: int = 32, patch_size: int = 8, aux_logits: bool = True
    ) -> None:
        super().__init__(num_classes=num_classes, aux_logits=aux_logits, init_weights=True)
        self.maxpool1 = RNNPoolLayer(64, hidden_size, hidden_size, patch_size, stride=4)
        for name in ("conv2", "conv3", "maxpool2", "inception3a", "inception3b"):
            setattr(self, name, nn.Identity())
        self.inception4a = _googlenet.Inception(4 * hidden_size, 192, 96, 208, 16, 48, 64)
        self.num_features = self.fc.in_features
        self.feature_info = [
            dict(module="conv1", num_chs=64, reduction=2),
            dict(module="inception3b", num_chs=4 * hidden_size, reduction=8),
            dict(module="inception4e", num_chs=832, reduction=16),
            dict(module="inception5b", num_chs=self.num_features, reduction=32),
        ]

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [(name, getattr(self, name)) for name in GOOGLENET_STAGES]

    def forward(self, x: torch.Tensor) -> torch.Tensor | _googlenet.GoogLeNetOutputs:
        if self.training and self.aux_logits:
            return torchvision.models.GoogLeNet.forward(self, x)
        return super().forward(x)


_TABLE1 = "RNNPool Table 1 (ImageNet-10, 10 classes)"
register_model(
    "efficientnet_b0_rnnpool",
    EfficientNetB0RNNPool,
    paper=dict(source=_TABLE1, top1=96.40, params_m=3.90, madds_g=0.33),
)
register_model(
    "resnet18_rnnpool", ResNet18RNNPool, paper=dict(source=_TABLE1, top1=94.40, params_m=10.60, madds_g=0.95)
)
register_model("densenet121", DenseNet, paper=dict(source=_TABLE1, top1=95.40, params_m=6.96, madds_g=2.83))
register_model(
    "densenet121_rnnpool",
    DenseNet,
    kwargs=dict(downsample="rnnpool"),
    paper=dict(source=_TABLE1, top1=94.80, params_m=5.60, madds_g=1.04),
)
register_model(
    "googlenet_rnnpool",
    GoogLeNetRNNPool,
    paper=dict(source=_TABLE1, top1=95.60, params_m=9.35, madds_g=0.81),
)
