"""The RNNPool paper's networks against its Tables 1, 2 and 3: parameters and MAdds (leanvision.profile).

One test per table row. The default bound is 3%. Where the paper cannot be matched, the row names a reason
below (paper value, our value, why) and gets the looser bound next to it. Our MAdds are what
`leanvision.profile` counts executing the network (conv, linear, matmul; the RNNPool recurrences as run:
RNN1 once per row/column segment that overlapping patches share, RNN2 per patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from leanvision.analysis.cost import profile

# Why some rows cannot be matched (our numbers at 10 classes unless stated; the paper's in each row).
TABLE10_PARAMS = (
    "Table 10's MobileNetV2-RNNPool (stem, RNNPool 32->64, the listed bottlenecks from 64 channels, 1x1 conv "
    "1280, classifier) holds 2,216,686 params; the paper prints 2.0M for it and for every same-shaped "
    "downsampling row (3.2M vs our 3,484,876 at 1000 classes). Its base (2.2M) and ReNet (2.3M) rows match "
    "ours, so ~0.2M is missing from the paper's count of these rows, not from the network."
)
MOBILENETV2_BODY = (
    "MobileNetV2 rows after a 4x downsampling layer: the paper's MAdds are ~15M below ours for every kind "
    "(avgpool 0.200G vs 0.216G, strided conv 0.258G vs 0.272G, ReNet 0.296G vs 0.311G), about what the "
    "first 64-channel bottleneck costs extra for reading 64 (Table 10) rather than 32 channels. The same "
    "construction matches Table 3 for MobileNetV1 to 0.0-2.3%."
)
DENSENET_BODY = (
    "DenseNet121 rows after a 4x downsampling layer: the paper's are ~0.21G below ours for every kind "
    "(avgpool 0.71G vs 0.92G, strided conv 1.33G vs 1.53G, ReNet 1.35G vs 1.55G, RNNPool 1.04G vs 1.28G), "
    "while the base row (2.83G) and all parameter counts match. The differences between rows agree with "
    "ours (the downsampling layers cost what the paper says); what is left after T2 is torchvision's "
    "DenseNet121 (conv0 118M, T2 39M, D3 549M, T3 103M, D4 104M), which the paper describes but does not "
    "specify further."
)
DENSENET_LAST = (
    "DenseNet121 with the last pool replaced: the paper adds 0.22G over the base (3.05G vs 2.83G); an "
    "RNNPool with h1 = h2 = 1024 / 4 over the 7x7x1024 map (F.1.2) executes 36M MAdds (ours 2.87G), so the "
    "paper's extra 0.2G cannot come from that layer."
)
RESNET18_RNNPOOL = (
    "ResNet18-RNNPool: ours 1.14G vs 0.95G. conv1 (118M) and the unchanged conv4_x/conv5_x (822M) already "
    "total 0.94G, leaving the paper ~10M for an RNNPool of 64 -> 128 channels over 729 8x8 patches, whose "
    "RNN2 sweeps alone take 48M MAdds. The parameter count matches (10.51M vs 10.60M)."
)
GOOGLENET = (
    "GoogLeNet: torchvision's inception uses a 3x3 conv where the paper's GoogLeNet has a 5x5 (84M MAdds "
    "fewer at 224), and the paper counts the auxiliary classifiers' parameters (ours with them: 9,960,638 "
    "for the base, exactly the paper's 9.96M). GoogLeNet-RNNPool: 0.92G vs 0.81G."
)
VWW_PARAMS = (
    "VWW: our networks are the EdgeML reference's (the same 242 tensors; EdgeML checkpoints load, logits "
    "equal within 4e-6). The RNNPool VWW model has 281,902 params where the paper prints 255K, and every "
    "4x-downsampled row is ~27K above the paper's; the base (286,946 vs 296K, Chowdhery et al.'s TF "
    "model) rounds channels differently."
)
VWW_LAST = (
    "VWW with the last pool replaced by RNNPool(320 -> h1 = h2 = 80), the EdgeML 2-RNNPool model: that layer "
    "has 45,124 params and executes 3.5M MAdds; the paper adds 4K params and 0.2M MAdds for it."
)
VWW_BASE_MADDS = (
    "VWW base: 48.3M MAdds vs 53.2M; the paper's baseline is Chowdhery et al.'s TensorFlow MobileNetV2-0.35 "
    "(different channel rounding), while every 4x-downsampled row matches ours within 1.5%."
)
RNNPOOL_LAST_MADDS = (
    "Both replacements in MobileNetV2 (RNNPool at the start and at the end): each adds what its single row "
    "adds, in the paper (0.226G + 0.034G = 0.260G) as in ours (0.251G + 0.056G = 0.307G), so the two "
    "rows' differences add up here."
)


@dataclass(frozen=True)
class Row:
    model: str
    kwargs: dict
    num_classes: int
    params: float  # paper
    madds: float  # paper
    params_tol: float = 0.03
    madds_tol: float = 0.03
    why: str = ""


MOBILENETV2_T2 = {
    "base": Row("mobilenetv2_100", {}, 10, 2.2e6, 0.300e9),
    "last_rnnpool": Row(
        "mobilenetv2_100",
        dict(last_pool="rnnpool"),
        10,
        2.9e6,
        0.334e9,
        madds_tol=0.08,
        why="RNNPool(1280 -> 320, 320) over the 7x7 map executes 56M MAdds, the paper adds 34M",
    ),
    "avgpool": Row(
        "mobilenetv2_100",
        dict(downsample="avgpool"),
        10,
        2.0e6,
        0.200e9,
        0.12,
        0.10,
        TABLE10_PARAMS + " " + MOBILENETV2_BODY,
    ),
    "maxpool": Row(
        "mobilenetv2_100",
        dict(downsample="maxpool"),
        10,
        2.0e6,
        0.200e9,
        0.12,
        0.10,
        TABLE10_PARAMS + " " + MOBILENETV2_BODY,
    ),
    "strided_conv": Row(
        "mobilenetv2_100",
        dict(downsample="strided_conv"),
        10,
        2.1e6,
        0.258e9,
        0.12,
        0.07,
        TABLE10_PARAMS + " " + MOBILENETV2_BODY,
    ),
    "renet": Row(
        "mobilenetv2_100", dict(downsample="renet"), 10, 2.3e6, 0.296e9, madds_tol=0.07, why=MOBILENETV2_BODY
    ),
    "rnnpool": Row(
        "mobilenetv2_100",
        dict(downsample="rnnpool"),
        10,
        2.0e6,
        0.226e9,
        0.12,
        0.14,
        TABLE10_PARAMS + " " + MOBILENETV2_BODY,
    ),
    "rnnpool_last": Row(
        "mobilenetv2_100",
        dict(downsample="rnnpool", last_pool="rnnpool"),
        10,
        2.7e6,
        0.260e9,
        0.12,
        0.20,
        TABLE10_PARAMS + " " + MOBILENETV2_BODY + " " + RNNPOOL_LAST_MADDS,
    ),
}
DENSENET121_T2 = {
    "base": Row("densenet121", {}, 10, 6.96e6, 2.83e9),
    "last_rnnpool": Row(
        "densenet121", dict(last_pool="rnnpool"), 10, 7.41e6, 3.05e9, madds_tol=0.07, why=DENSENET_LAST
    ),
    "avgpool": Row(
        "densenet121", dict(downsample="avgpool"), 10, 5.59e6, 0.71e9, madds_tol=0.32, why=DENSENET_BODY
    ),
    "maxpool": Row(
        "densenet121", dict(downsample="maxpool"), 10, 5.59e6, 0.71e9, madds_tol=0.32, why=DENSENET_BODY
    ),
    "strided_conv": Row(
        "densenet121", dict(downsample="strided_conv"), 10, 6.38e6, 1.33e9, madds_tol=0.17, why=DENSENET_BODY
    ),
    "renet": Row(
        "densenet121", dict(downsample="renet"), 10, 6.41e6, 1.35e9, madds_tol=0.17, why=DENSENET_BODY
    ),
    "rnnpool": Row(
        "densenet121", dict(downsample="rnnpool"), 10, 5.60e6, 1.04e9, madds_tol=0.26, why=DENSENET_BODY
    ),
    "rnnpool_last": Row(
        "densenet121",
        dict(downsample="rnnpool", last_pool="rnnpool"),
        10,
        6.06e6,
        1.26e9,
        madds_tol=0.07,
        why=DENSENET_BODY + " " + DENSENET_LAST,
    ),
}
VWW_T2 = {
    "base": Row("mobilenetv2_035_vww", {}, 2, 296e3, 53.2e6, 0.04, 0.10, VWW_BASE_MADDS),
    "last_rnnpool": Row(
        "mobilenetv2_035_vww", dict(last_pool="rnnpool"), 2, 300e3, 53.4e6, 0.12, 0.04, VWW_LAST
    ),
    "avgpool": Row(
        "mobilenetv2_035_vww",
        dict(downsample="avgpool", hidden_size=8),
        2,
        255e3,
        31.9e6,
        0.12,
        why=VWW_PARAMS,
    ),
    "maxpool": Row(
        "mobilenetv2_035_vww",
        dict(downsample="maxpool", hidden_size=8),
        2,
        255e3,
        31.9e6,
        0.12,
        why=VWW_PARAMS,
    ),
    "strided_conv": Row(
        "mobilenetv2_035_vww",
        dict(downsample="strided_conv", hidden_size=8),
        2,
        264e3,
        39.2e6,
        0.12,
        why=VWW_PARAMS,
    ),
    "renet": Row(
        "mobilenetv2_035_vww", dict(downsample="renet", hidden_size=8), 2, 277e3, 46.4e6, 0.10, why=VWW_PARAMS
    ),
    "rnnpool": Row("mobilenetv2_035_vww_rnnpool", {}, 2, 255e3, 37.7e6, 0.12, 0.05, VWW_PARAMS),
    "rnnpool_last": Row(
        "mobilenetv2_035_vww_rnnpool",
        dict(last_pool="rnnpool"),
        2,
        259e3,
        37.9e6,
        0.28,
        0.15,
        VWW_PARAMS + " " + VWW_LAST,
    ),
}
TABLE1 = {
    "mobilenetv2": Row(
        "mobilenetv2_rnnpool", {}, 10, 2.00e6, 0.23e9, 0.12, 0.12, TABLE10_PARAMS + " " + MOBILENETV2_BODY
    ),
    "efficientnet_b0": Row("efficientnet_b0_rnnpool", {}, 10, 3.90e6, 0.33e9),
    "resnet18": Row("resnet18_rnnpool", {}, 10, 10.60e6, 0.95e9, madds_tol=0.22, why=RESNET18_RNNPOOL),
    "densenet121": Row("densenet121_rnnpool", {}, 10, 5.60e6, 1.04e9, madds_tol=0.26, why=DENSENET_BODY),
    "googlenet": Row("googlenet_rnnpool", {}, 10, 9.35e6, 0.81e9, madds_tol=0.16, why=GOOGLENET),
}
TABLE3 = {
    "mobilenetv1": Row("mobilenetv1_100", {}, 1000, 4.2e6, 569e6),
    "mobilenetv1_renet": Row("mobilenetv1_rnnpool", dict(downsample="renet"), 1000, 4.2e6, 487e6),
    "mobilenetv1_rnnpool": Row("mobilenetv1_rnnpool", {}, 1000, 4.1e6, 417e6),
    "mobilenetv2": Row(
        "mobilenetv2_100",
        {},
        1000,
        3.4e6,
        300e6,
        params_tol=0.04,
        why="torchvision's MobileNetV2 has 3,504,872 params; the paper quotes the original 3.4M",
    ),
    "mobilenetv2_renet": Row(
        "mobilenetv2_rnnpool",
        dict(downsample="renet"),
        1000,
        3.6e6,
        296e6,
        madds_tol=0.07,
        why=MOBILENETV2_BODY,
    ),
    "mobilenetv2_rnnpool": Row(
        "mobilenetv2_rnnpool", {}, 1000, 3.2e6, 226e6, 0.10, 0.14, TABLE10_PARAMS + " " + MOBILENETV2_BODY
    ),
}
ROWS = {
    **{f"table1-{k}": v for k, v in TABLE1.items()},
    **{f"table2-mobilenetv2-{k}": v for k, v in MOBILENETV2_T2.items()},
    **{f"table2-densenet121-{k}": v for k, v in DENSENET121_T2.items()},
    **{f"table2-vww-{k}": v for k, v in VWW_T2.items()},
    **{f"table3-{k}": v for k, v in TABLE3.items()},
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_paper_params_and_madds(row: Row):
    assert (row.params_tol, row.madds_tol) == (0.03, 0.03) or row.why, "a looser bound needs its reason"
    report = profile(row.model, num_classes=row.num_classes, **row.kwargs)
    assert report.params == pytest.approx(row.params, rel=row.params_tol)
    assert report.macs == pytest.approx(row.madds, rel=row.madds_tol)
