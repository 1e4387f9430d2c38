"""RRR-Net (Sun et al., 2023, arXiv:2310.01157): reuse a pretrained ResNet, reduce it to its first blocks,
recycle its top into an ensemble of narrower branches.

- Reduce ("ResNet a b c d"): conv1..maxpool and the FIRST a, b, c, d blocks of layer1..layer4 of a
  torchvision ResNet, then global pooling and a classifier. Weights come by name from a torchvision or timm
  ResNet state_dict (`create_model(..., pretrained=FILE)`, i.e. `load_pretrained`); the classifier is
  copied when its shape fits, else it starts fresh.
- Recycle (`branches=N`): conv1..layer2 is the shared stem; everything after it becomes N branches, each
  layer3 -> layer4 -> global pool -> Linear at widths p3 = floor(256/sqrt(N)) - s, p4 = floor(512/sqrt(N))
  - s, with s the smallest shift >= 0 such that N branches have no more parameters than the unsplit top.
  A split branch's convolutions start from slices of the pretrained kernels of the same layer: the first
  `in` input channels, and consecutive blocks of output channels per branch, taken from 0..C-1 followed by
  random permutations of it (drawn from a generator seeded by `seed`) when N blocks need more than C.
  Split branches' BatchNorm layers and classifiers start fresh. With N = 1 the top is the unsplit one and
  every tensor is copied, so `branches=1` is the reduced ResNet itself.
- `forward` returns the LOG of the branches' averaged softmax probabilities (log-probabilities, so
  `nll_loss` and `argmax` apply, and cross-entropy on them equals cross-entropy on the logits when N = 1);
  `forward_branches` gives every branch's logits. `freeze_stem` / `warm_stem` implement the paper's
  frozen, BN-warmed stem; `leanvision.deploy.FusedRRRNet` is the inference form with all branches in one
  set of wide and grouped convolutions.
- The shared interface: `forward_features` is the stem (the last map that is one map), `forward_head` the
  branches; `get_classifier` gives the N classifiers (a tuple, as timm's two-headed models do) and
  pre-logits are the N pooled vectors side by side. There is no `features_only`: past the stem the
  network is N maps, so it has no feature_info.

Keys follow torchvision's for the stem (`conv1`, `bn1`, `layer1.0...`, `layer2.0...`); branch `b` holds
`branches.b.layer3...`, `branches.b.layer4...`, `branches.b.fc`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from leanvision.errors import CheckpointError, InvalidArgumentError
from leanvision.layers import create_classifier
from leanvision.models.base import ClassifierBase, init_like_torchvision
from leanvision.models.registry import register_model
from leanvision.models.weights import load_checkpoint, read_state_dict

Block = type[BasicBlock] | type[Bottleneck]
RESNETS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
STEM = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")
TOP_WIDTHS = (256, 512)  # planes of layer3 and layer4 in every torchvision ResNet


def make_stage(block: Block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` ResNet blocks of width `planes`, laid out as torchvision's `ResNet._make_layer` does."""
    out_chs = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_chs:
        downsample = nn.Sequential(conv1x1(inplanes, out_chs, stride), nn.BatchNorm2d(out_chs))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out_chs, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class Branch(nn.Module):
    """The top of a ResNet at any width: layer3 -> layer4 -> global average pool -> fc (logits)."""

    def __init__(
        self, block: Block, inplanes: int, widths: tuple[int, int], blocks: tuple[int, int], num_classes: int
    ) -> None:
        super().__init__()
        self.layer3 = make_stage(block, inplanes, widths[0], blocks[0], stride=2)
        self.layer4 = make_stage(block, widths[0] * block.expansion, widths[1], blocks[1], stride=2)
        self.num_features = widths[1] * block.expansion
        self.fc = create_classifier(self.num_features, num_classes)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Stem map -> the pooled vector the classifier sees, [B, num_features]."""
        return torch.flatten(F.adaptive_avg_pool2d(self.layer4(self.layer3(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pre_logits(x))


def count_branch_params(
    block: Block, widths: tuple[int, int], blocks: tuple[int, int], num_classes: int
) -> int:
    """Parameters of one Branch (built on the meta device, so nothing is allocated)."""
    with torch.device("meta"):
        branch = Branch(block, 128 * block.expansion, widths, blocks, num_classes)
    return sum(p.numel() for p in branch.parameters())


def branch_widths(
    backbone: str, blocks: tuple[int, ...], branches: int, num_classes: int
) -> tuple[int, int, int]:
    """(p3, p4, s): branch widths of layer3 / layer4 and the shift s of the width rule (module docstring)."""
    block = RESNETS[backbone][0]
    top_blocks = (blocks[2], blocks[3])
    budget = count_branch_params(block, TOP_WIDTHS, top_blocks, num_classes)
    base3, base4 = (math.isqrt(w * w // branches) for w in TOP_WIDTHS)  # floor(w / sqrt(N)), exactly
    for shift in range(min(base3, base4)):
        widths = (base3 - shift, base4 - shift)
        if branches * count_branch_params(block, widths, top_blocks, num_classes) <= budget:
            return (*widths, shift)
    raise InvalidArgumentError(
        f"branches={branches} leaves no width: {branches} branches of {backbone}'s top (floor(256/sqrt(N)) = "
        f"{base3} channels before the shift) cannot fit in the unsplit top's {budget:,} parameters"
    )


def _check_blocks(backbone: str, blocks: tuple[int, ...]) -> tuple[int, int, int, int]:
    depths = RESNETS[backbone][1]
    blocks = tuple(blocks)
    if len(blocks) != 4 or not all(isinstance(b, int) for b in blocks):
        raise InvalidArgumentError(f"blocks must be four integers (layer1..layer4), got {blocks}")
    for stage, (kept, depth) in enumerate(zip(blocks, depths), start=1):
        if not 1 <= kept <= depth:
            raise InvalidArgumentError(
                f"blocks={blocks}: layer{stage} of {backbone} has {depth} blocks, so its count must be in "
                f"1..{depth} (got {kept}); {backbone} has {depths}"
            )
    return blocks  # type: ignore[return-value]


def resnet_layout(state: Mapping[str, torch.Tensor]) -> tuple[Block, tuple[int, ...]] | None:
    """Block type and blocks per stage of a torchvision/timm ResNet state_dict; None for other layouts."""
    if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
        return None
    block = Bottleneck if "layer1.0.conv3.weight" in state else BasicBlock
    depths = []
    for stage in range(1, 5):
        indices = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        depths.append(max(indices) + 1 if indices else 0)
    return block, tuple(depths)


def _output_order(channels: int, needed: int, generator: torch.Generator) -> torch.Tensor:
    """0..channels-1, then random permutations of it, until there are `needed` indices."""
    parts = [torch.arange(channels)]
    while sum(len(p) for p in parts) < needed:
        parts.append(torch.randperm(channels, generator=generator))
    return torch.cat(parts)[:needed]


class RRRNet(ClassifierBase):
    """A reduced ResNet (`blocks` per stage) whose top is split into `branches` branches (module docstring).

    `load_pretrained(FILE)` (what `create_model(..., pretrained=FILE)` calls) reads a local torchvision/timm
    ResNet state_dict of `backbone` by name; `seed` seeds the random part of the kernel slicing.
    """

    def __init__(
        self,
        backbone: str = "resnet152",
        blocks: tuple[int, ...] = (1, 1, 1, 1),
        branches: int = 1,
        num_classes: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if backbone not in RESNETS:
            raise InvalidArgumentError(f"unknown backbone {backbone!r}; expected one of {sorted(RESNETS)}")
        if not isinstance(branches, int) or branches < 1:
            raise InvalidArgumentError(f"branches must be an integer >= 1, got {branches!r}")
        self.backbone, self.seed = backbone, seed
        self.blocks = _check_blocks(backbone, blocks)
        block = RESNETS[backbone][0]
        self.widths = branch_widths(backbone, self.blocks, branches, num_classes)
        self.frozen: tuple[str, ...] = ()  # names of the submodules `freeze` fixed

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_stage(block, 64, 64, self.blocks[0], stride=1)
        self.layer2 = make_stage(block, 64 * block.expansion, 128, self.blocks[1], stride=2)
        self.branches = nn.ModuleList(
            Branch(block, 128 * block.expansion, self.widths[:2], self.blocks[2:], num_classes)
            for _ in range(branches)
        )
        self.num_features = sum(branch.num_features for branch in self.branches)
        init_like_torchvision(self)

    @property
    def num_classes(self) -> int:
        fc = self.branches[0].fc
        return fc.out_features if isinstance(fc, nn.Linear) else 0

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The shared stem, conv1 .. layer2: `forward_features` gives the layer2 map every branch reads."""
        return [(name, getattr(self, name)) for name in STEM]

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> per-branch logits [B, N, classes] (one branch after the other)."""
        features = self.forward_features(x)
        return torch.stack([branch(features) for branch in self.branches], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Stem map -> log of the branches' averaged softmax probabilities, [B, classes]; with
        pre_logits (or no classifiers), the branches' pooled vectors side by side, [B, num_features]."""
        if pre_logits or not self.num_classes:
            return torch.cat([branch.pre_logits(x) for branch in self.branches], dim=1)
        return average_log_probs(torch.stack([branch(x) for branch in self.branches], dim=1))

    def get_classifier(self) -> tuple[nn.Module, ...]:
        """The branches' classifiers, branch 0 first."""
        return tuple(branch.fc for branch in self.branches)

    def reset_classifier(self, num_classes: int) -> None:
        """Give every branch a fresh classifier for `num_classes` (0 removes them)."""
        for branch in self.branches:
            branch.fc = create_classifier(branch.num_features, num_classes)

    @property
    def stem_frozen(self) -> bool:
        return set(STEM) <= set(self.frozen)

    def freeze_stem(self) -> None:
        """Stop gradients into the stem and keep its BatchNorm layers in eval mode from now on."""
        self.freeze(STEM)

    def freeze(self, names: Iterable[str]) -> None:
        """Stop gradients into the named submodules (e.g. "layer1", "branches.0.layer4") and keep them in
        eval mode from now on (a linear probe freezes everything but the classifiers)."""
        names = tuple(names)
        modules = [self.get_submodule(name) for name in names]  # an unknown name raises AttributeError
        for module in modules:
            module.requires_grad_(False)
        self.frozen = tuple(dict.fromkeys((*self.frozen, *names)))
        self.train(self.training)

    def train(self, mode: bool = True) -> RRRNet:
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self

    @torch.no_grad()
    def warm_stem(self, batches: Iterable[torch.Tensor]) -> None:
        """Update the stem's BN running statistics with train-mode passes over `batches` (no gradients)."""
        for _, module in self.stages():
            module.train()
        for images in batches:
            self.forward_features(images.to(self.conv1.weight.device))
        self.train(self.training)

    def load_pretrained(self, path: str | Path) -> RRRNet:
        """Load a checkpoint of this model (our layout, exact fit) or a torchvision/timm ResNet file."""
        state = read_state_dict(path)
        if any(k.startswith("branches.") for k in state):
            return load_checkpoint(self, path)
        self.load_backbone_(state, str(path))
        return self

    @torch.no_grad()
    def load_backbone_(self, state: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
        """Copy a full ResNet's tensors by name: the stem as is, the top as is or sliced (see the module)."""
        self._check_backbone_state(state, source)
        own = self.state_dict()
        needed = [k for k in own if not k.startswith("branches.")]
        needed += [k for k in self.branches[0].state_dict() if not k.startswith("fc.")]
        missing = [k for k in needed if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise CheckpointError(
                f"{source} lacks {len(missing)} tensor(s) of the {self.backbone} blocks the model keeps "
                f"(first: {missing[:3]}); expected a full {self.backbone} state_dict"
            )
        loaded = {k: state[k] for k in own if not k.startswith("branches.") and k in state}
        for key, value in loaded.items():
            if value.shape != own[key].shape:
                raise CheckpointError(
                    f"{source}: tensor {key!r} has shape {list(value.shape)}, {self.backbone} expects "
                    f"{list(own[key].shape)} (weights of another ResNet variant or width?)"
                )
        generator = torch.Generator().manual_seed(self.seed)
        n = len(self.branches)
        for key, target in self.branches[0].state_dict().items():
            pretrained = state.get(key)
            if pretrained is None:
                continue
            if pretrained.shape == target.shape:  # the unsplit top (N = 1), or a classifier that fits
                loaded.update({f"branches.{b}.{key}": pretrained for b in range(n)})
            elif pretrained.ndim == 4:  # a split convolution: a slice of the pretrained kernel per branch
                out_chs, in_chs = target.shape[:2]
                order = _output_order(pretrained.shape[0], n * out_chs, generator)
                for b in range(n):
                    loaded[f"branches.{b}.{key}"] = pretrained[
                        order[b * out_chs : (b + 1) * out_chs], :in_chs
                    ].clone()
        self.load_state_dict(loaded, strict=False)

    def _check_backbone_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        layout = resnet_layout(state)
        if layout is None:
            raise CheckpointError(
                f"{source} is not a torchvision/timm ResNet state_dict (needs 'conv1.weight' and "
                f"'layer1.0.conv1.weight'); its first keys are {list(state)[:5]}"
            )
        block, depths = RESNETS[self.backbone]
        if layout != (block, depths):
            found = next((name for name, spec in RESNETS.items() if spec == layout), "a ResNet")
            raise CheckpointError(
                f"{source} holds {found} weights ({layout[0].__name__} blocks {layout[1]}), but the model "
                f"is rrrnet_{self.backbone} ({block.__name__} blocks {depths}): pass {self.backbone} weights"
            )


def average_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log(mean over branches of softmax(logits)) for logits [B, N, classes], computed stably."""
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(logits.shape[1])


for _name in RESNETS:
    register_model(f"rrrnet_{_name}", RRRNet, kwargs={"backbone": _name})
