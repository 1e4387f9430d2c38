"""FusedRRRNet: the inference form of an RRR-Net, its N branches run as one network of wide and grouped
convolutions, BatchNorm folded, each convolution with its ReLU and residual add in one oneDNN call."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from leanvision.deploy.fold import fold_batchnorm_
from leanvision.deploy.onednn import PackedWeights, conv_add_relu
from leanvision.layers.conv import stack_convs
from leanvision.models.rrrnet import RRRNet, average_log_probs

STEM_CHUNK_BYTES = 16 * 2**20  # largest stem map per call, well under glibc's mmap threshold


class FusedConv(nn.Module):
    """Inference: a (BN-folded) convolution, then optionally a residual add, then optionally ReLU: one call.

    On CPU it runs as one oneDNN primitive with the add and ReLU as post-ops, on a weight reordered into
    oneDNN's blocked layout once per input shape (deploy.onednn): a plain call reorders the weight on every
    call, which at batch 1 costs as much as the convolution for the large 1x1 kernels of the fused
    branches. The packed weights are taken on first use: change `conv` only before that.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.relu = conv, relu
        self.packed = PackedWeights()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv_add_relu(self.conv, x, residual, self.relu, self.packed)


class FusedBlock(nn.Module):
    """A BN-folded ResNet block (Basic or Bottleneck): ReLU after every convolution, the last one's after
    the residual add, each fused into its convolution's call (FusedConv).

    When the last convolution and the projection shortcut are both 1x1 with the same groups (a Bottleneck
    with a downsample, branch-grouped or not), their sum is one 1x1 convolution over the concatenated
    inputs, group by group: [W_last W_down] [h; x[::s, ::s]] + (b_last + b_down). That is one call instead
    of two, and the projection's map is never written out and read back.
    """

    def __init__(self, convs: list[nn.Conv2d], downsample: nn.Conv2d | None) -> None:
        super().__init__()
        self.shortcut_stride = 0  # > 0: the projection is merged into the last convolution
        last = convs[-1]
        if _mergeable(last, downsample):
            self.shortcut_stride = downsample.stride[0]
            convs, downsample = [*convs[:-1], _merge_shortcut(last, downsample)], None
        self.convs = nn.ModuleList(FusedConv(conv, relu=True) for conv in convs)
        self.downsample = None if downsample is None else FusedConv(downsample, relu=False)

    @classmethod
    def of(cls, block: nn.Module) -> FusedBlock:
        """From a torchvision block whose BatchNorms are folded (fold_batchnorm_)."""
        convs = [getattr(block, name) for name in ("conv1", "conv2", "conv3") if hasattr(block, name)]
        return cls(convs, None if block.downsample is None else block.downsample[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.convs[:-1]:
            h = conv(h)
        if self.shortcut_stride:
            s, last = self.shortcut_stride, self.convs[-1]
            return last(_concat_by_group([h, x[:, :, ::s, ::s]], last.conv.groups))
        return self.convs[-1](h, x if self.downsample is None else self.downsample(x))


def _mergeable(last: nn.Conv2d, downsample: nn.Conv2d | None) -> bool:
    """Whether last(h) + downsample(x) is one 1x1 convolution over _concat_by_group([h, x[::s, ::s]])."""
    return (
        downsample is not None
        and all(c.kernel_size == (1, 1) and c.padding == (0, 0) for c in (last, downsample))
        and last.stride == (1, 1)
        and last.groups == downsample.groups
    )


def _concat_by_group(maps: list[torch.Tensor], groups: int) -> torch.Tensor:
    """Concatenate feature maps channel-wise within each of `groups` channel groups, [a_0 b_0 a_1 b_1 ...],
    into a channels_last map."""
    nhwc = [m.permute(0, 2, 3, 1).unflatten(3, (groups, -1)) for m in maps]
    return torch.cat(nhwc, dim=4).flatten(3).permute(0, 3, 1, 2)


def _merge_shortcut(last: nn.Conv2d, downsample: nn.Conv2d) -> nn.Conv2d:
    """The 1x1 convolution over _concat_by_group([h, x]) that computes last(h) + downsample(x): each output
    row reads its group's inputs, so the kernels join along the input axis."""
    in_channels = last.in_channels + downsample.in_channels
    merged = nn.Conv2d(in_channels, last.out_channels, 1, groups=last.groups)
    merged.weight.data.copy_(torch.cat([last.weight, downsample.weight], dim=1))
    merged.bias.data.copy_(last.bias + downsample.bias)
    return merged


def _fuse_blocks(blocks: list[nn.Module], shared_input: bool) -> FusedBlock:
    """The same block at N times the width: branch b's channels are the b-th slice of every map."""
    names = [name for name in ("conv1", "conv2", "conv3") if hasattr(blocks[0], name)]
    # conv1 reads the block input; conv2, conv3 the branch's own map
    convs = [
        stack_convs([getattr(b, name) for b in blocks], split_input=not (shared_input and i == 0))
        for i, name in enumerate(names)
    ]
    downsample = None
    if blocks[0].downsample is not None:
        downsample = stack_convs([b.downsample[0] for b in blocks], split_input=not shared_input)
    return FusedBlock(convs, downsample)


class FusedRRRNet(nn.Module):
    """Inference-only RRR-Net: the N branches run as one network (same outputs as the per-branch loop).

    The first convolutions after the stem (layer3[0]'s conv1 and projection) are one wide convolution each,
    reading the stem map once for all branches; every later convolution is grouped with one group per
    branch, and the classifiers are one grouped 1x1 convolution. Being inference-only, it also folds every
    BatchNorm (stem included) into its convolution, runs every convolution with its ReLU and residual add
    as one oneDNN call on weights packed once (FusedConv), and keeps activations channels_last
    (benchmarks/rrr_speed.py measures the gains; README "RRR-Net").

    The stem runs on chunks of the batch of at most STEM_CHUNK_BYTES per map, the top on all of it: glibc's
    malloc serves blocks above its 32 MiB mmap threshold with fresh pages on every call, and faulting those
    in would be paid on every forward; chunks are served from reused memory instead.
    """

    def __init__(self, model: RRRNet) -> None:
        super().__init__()
        model = copy.deepcopy(model).eval()
        fold_batchnorm_(model)
        stem_blocks = [*model.layer1, *model.layer2]
        self.stem = nn.Sequential(
            FusedConv(model.conv1, relu=True), model.maxpool, *map(FusedBlock.of, stem_blocks)
        )
        self.num_branches = len(model.branches)
        stages = []
        for stage in ("layer3", "layer4"):
            layers = [getattr(b, stage) for b in model.branches]
            stages += [
                _fuse_blocks([layer[j] for layer in layers], shared_input=stage == "layer3" and j == 0)
                for j in range(len(layers[0]))
            ]
        self.top = nn.Sequential(*stages)
        fcs = [b.fc for b in model.branches]
        self.fc = nn.Conv2d(
            fcs[0].in_features * self.num_branches, fcs[0].out_features * self.num_branches, 1,
            groups=self.num_branches,
        )  # fmt: skip
        self.fc.weight.data.copy_(torch.cat([fc.weight for fc in fcs])[:, :, None, None])
        self.fc.bias.data.copy_(torch.cat([fc.bias for fc in fcs]))
        self.requires_grad_(False).eval().to(memory_format=torch.channels_last)

    def stem_chunk(self, x: torch.Tensor) -> int:
        """Images per stem call: as many as keep conv1's output (the stem's largest map) within
        STEM_CHUNK_BYTES."""
        conv1 = self.stem[0].conv
        map_bytes = (
            conv1.out_channels * x[0, 0, :: conv1.stride[0], :: conv1.stride[1]].numel() * x.element_size()
        )
        return max(1, STEM_CHUNK_BYTES // map_bytes)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> per-branch logits [B, N, classes]."""
        chunks = x.contiguous(memory_format=torch.channels_last).split(self.stem_chunk(x))
        x = self.stem(chunks[0]) if len(chunks) == 1 else torch.cat([self.stem(c) for c in chunks])
        x = self.top(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x).flatten(1).unflatten(1, (self.num_branches, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the branches' averaged softmax probabilities, [B, classes]."""
        return average_log_probs(self.forward_branches(x))
