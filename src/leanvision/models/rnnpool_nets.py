"""RNNPool versions of torchvision's EfficientNet-B0, ResNet18, DenseNet121 and GoogLeNet (RNNPool paper,
Section 4, Table 1 and Appendices E.2.2, F.1).

Each network keeps torchvision's modules and keys; an RNNPoolLayer (Table 9 hidden sizes and patch sizes,
stride 4) replaces the early blocks that work on the largest maps, taking the 112x112 output of the first
convolution straight to 28x28:
- EfficientNet-B0: stages 1-3 (MBConv 16, 24, 40); the first MBConv 80 takes the 64 RNNPool channels;
- ResNet18: the max pool, conv2_x and conv3_x; conv4_x takes the 128 RNNPool channels as before;
- DenseNet121: P1, D1, T1 and D2 (Figure 2); T2's 1x1 conv takes the 192 RNNPool channels;
- GoogLeNet: max pool 1, conv2, conv3, max pool 2 and inceptions 3a, 3b (E.2.2 puts its peak memory at
  inception 4e, so nothing at 28x28 is left); max pool 3 then takes the 128 RNNPool channels to 14x14.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.densenet import _Transition
from torchvision.models.efficientnet import MBConv, MBConvConfig

from leanvision.errors import InvalidArgumentError
from leanvision.layers import RNNPool, RNNPoolLayer
from leanvision.layers.downsample import create_downsample
from leanvision.models.registry import register_model

_googlenet = sys.modules["torchvision.models.googlenet"]  # the module, shadowed by the builder function


def efficientnet_b0_rnnpool(num_classes: int = 1000, hidden_size: int = 16, patch_size: int = 6) -> nn.Module:
    """torchvision's EfficientNet-B0 with stages 1-3 replaced by an RNNPoolLayer (32 -> 4 * hidden)."""
    model = torchvision.models.efficientnet_b0(num_classes=num_classes)
    first = model.features[4][0]
    config = MBConvConfig(6, 3, 2, 4 * hidden_size, first.out_channels, 1)
    model.features[4][0] = MBConv(config, first.stochastic_depth.p, nn.BatchNorm2d)
    pool = RNNPoolLayer(model.features[0].out_channels, hidden_size, hidden_size, patch_size, stride=4)
    model.features = nn.Sequential(model.features[0], pool, *model.features[4:])
    return model


def resnet18_rnnpool(num_classes: int = 1000, hidden_size: int = 32, patch_size: int = 8) -> nn.Module:
    """torchvision's ResNet18 with max pool, conv2_x and conv3_x replaced by an RNNPoolLayer (64 -> 128)."""
    if 4 * hidden_size != 128:
        raise InvalidArgumentError(
            "ResNet18-RNNPool feeds conv4_x, which takes 128 channels: hidden_size must be 32"
        )
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.maxpool = RNNPoolLayer(64, hidden_size, hidden_size, patch_size, stride=4)
    model.layer1, model.layer2 = nn.Identity(), nn.Identity()
    return model


class DenseNet(torchvision.models.DenseNet):
    """torchvision's DenseNet with the RNNPool paper's options (all off by default: DenseNet121).

    - `downsample`: a DOWNSAMPLE_KINDS layer (4 * hidden_size channels) replaces P1, D1, T1 and D2;
    - `transition_pool="rnnpool"`: each remaining transition's 2x2 average pool becomes an RNNPoolLayer
      with patch 4, stride 2 and hidden C/4 (Appendix F.1.3);
    - `last_pool="rnnpool"`: an RNNPool over the whole last map, hidden C/4, replaces the global pool;
    - `block_config`: dense layers per block, e.g. (6, 12, 10, 6) drops 14 layers of D3 and 10 of D4.
    """

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
            t2 = blocks["transition2"].conv.out_channels
            replaced = ("pool0", "denseblock1", "transition1", "denseblock2", "transition2")
            blocks = OrderedDict(
                [(n, m) for n, m in blocks.items() if n in ("conv0", "norm0", "relu0")]
                + [("downsample", create_downsample(downsample, 64, hidden_size, patch_size, 4, nn.ReLU))]
                + [("transition2", _Transition(4 * hidden_size, t2))]
                + [(n, m) for n, m in blocks.items() if n not in replaced + ("conv0", "norm0", "relu0")]
            )
        if transition_pool == "rnnpool":
            for name, block in blocks.items():
                if name.startswith("transition"):
                    c = block.conv.out_channels
                    block.pool = RNNPoolLayer(c, c // 4, c // 4, patch_size=4, stride=2)
        self.features = nn.Sequential(blocks)
        channels = self.classifier.in_features
        self.global_pool = (
            nn.AdaptiveAvgPool2d(1) if last_pool == "avg" else RNNPool(channels, channels // 4, channels // 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.features(x))
        return self.classifier(self.global_pool(x).flatten(1))


def densenet121(**kwargs) -> DenseNet:
    """DenseNet121 (torchvision) with the RNNPool paper's options."""
    return DenseNet(**kwargs)


def densenet121_rnnpool(**kwargs) -> DenseNet:
    """DenseNet121-RNNPool (paper Figure 2): P1, D1, T1, D2 replaced by an RNNPoolLayer, h1 = h2 = 48."""
    return DenseNet(**{"downsample": "rnnpool", **kwargs})


def googlenet_rnnpool(
    num_classes: int = 1000, hidden_size: int = 32, patch_size: int = 8, aux_logits: bool = True
) -> nn.Module:
    """torchvision's GoogLeNet (auxiliary classifiers included, as the paper counts them) with everything
    from max pool 1 to inception 3b replaced by an RNNPoolLayer (64 -> 4 * hidden channels)."""
    model = torchvision.models.GoogLeNet(num_classes=num_classes, aux_logits=aux_logits, init_weights=True)
    model.maxpool1 = RNNPoolLayer(64, hidden_size, hidden_size, patch_size, stride=4)
    for name in ("conv2", "conv3", "maxpool2", "inception3a", "inception3b"):
        setattr(model, name, nn.Identity())
    model.inception4a = _googlenet.Inception(4 * hidden_size, 192, 96, 208, 16, 48, 64)
    return model


_TABLE1 = "RNNPool Table 1 (ImageNet-10, 10 classes)"
register_model(
    "efficientnet_b0_rnnpool",
    efficientnet_b0_rnnpool,
    paper=dict(source=_TABLE1, top1=96.40, params_m=3.90, madds_g=0.33),
)
register_model(
    "resnet18_rnnpool", resnet18_rnnpool, paper=dict(source=_TABLE1, top1=94.40, params_m=10.60, madds_g=0.95)
)
register_model(
    "densenet121", densenet121, paper=dict(source=_TABLE1, top1=95.40, params_m=6.96, madds_g=2.83)
)
register_model(
    "densenet121_rnnpool",
    densenet121_rnnpool,
    paper=dict(source=_TABLE1, top1=94.80, params_m=5.60, madds_g=1.04),
)
register_model(
    "googlenet_rnnpool",
    googlenet_rnnpool,
    paper=dict(source=_TABLE1, top1=95.60, params_m=9.35, madds_g=0.81),
)
