"""RNNPool: golden vectors from EdgeML, the fast path against literal Algorithm 1, cells, export, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rnnpool_reference as ref
from leanvision.layers import rnn_cells
from leanvision.layers.rnn_cells import (
    FastGRNNCell,
    GRUCell,
    LSTMCell,
    create_cell,
    quant_sigmoid,
    quant_tanh,
)
from leanvision.layers.rnnpool import RNNPool, RNNPoolLayer

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"


def load_golden(name: str) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    path = GOLDEN / name
    if not path.exists():
        pytest.skip(f"golden file {path} not found (shared/ must sit beside the repository)")
    data = np.load(path)
    state = {
        k.removeprefix("state_dict/"): torch.from_numpy(data[k])
        for k in data.files
        if k.startswith("state_dict/")
    }
    return state, {k: data[k] for k in data.files if not k.startswith("state_dict/")}


def test_golden_operator():
    state, arrays = load_golden("rnnpool_patches_c8_h8_k6.npz")
    pool = RNNPool.from_edgeml(state)
    assert (pool.in_channels, pool.hidden1, pool.hidden2) == (8, 8, 8)
    with torch.no_grad():
        out = pool(torch.from_numpy(arrays["patches"]))
    assert (out - torch.from_numpy(arrays["output"])).abs().max().item() <= 1e-5


def test_golden_layer_with_module_prefix():
    state, arrays = load_golden("rnnpool_layer_c8_h8_k6_s4.npz")
    layer = RNNPoolLayer.from_edgeml({f"module.{k}": v for k, v in state.items()}, patch_size=6, stride=4)
    with torch.no_grad():
        out = layer(torch.from_numpy(arrays["input"]))
    assert out.shape == (2, 32, 8, 8)
    assert (out - torch.from_numpy(arrays["output"])).abs().max().item() <= 1e-5


def randomize(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


# (in_channels, h1, h2, patch, stride, padding, cell, batch, H, W)
LAYER_CASES = [
    (3, 4, 6, 3, 2, "edgeml", "fastgrnn", 2, 9, 11),  # stride < patch, h1 != h2
    (2, 5, 3, (2, 4), (2, 4), "valid", "fastgrnn", 1, 8, 12),  # rectangular, stride == patch, batch 1
    (4, 3, 5, (4, 3), 5, "valid", "fastgrnn", 2, 14, 13),  # stride > patch, rectangular
    (3, 4, 4, 3, 2, "same", "fastgrnn", 1, 7, 8),
    (2, 3, 4, 3, 2, "same", "gru", 2, 7, 6),
    (2, 4, 3, (3, 2), 2, "edgeml", "lstm", 1, 8, 7),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{c[6]}-k{c[3]}-s{c[4]}-{c[5]}")
def test_fast_layer_equals_literal_algorithm_1(case):
    c, h1, h2, patch, stride, padding, cell, batch, height, width = case
    layer = randomize(RNNPoolLayer(c, h1, h2, patch, stride, padding=padding, cell=cell), seed=height)
    x = torch.randn(batch, c, height, width, generator=torch.Generator().manual_seed(width))
    with torch.no_grad():
        fast, slow = layer(x), ref.rnnpool_layer(layer, x)
    assert fast.shape == slow.shape == (batch, 4 * h2, *layer.output_size(height, width))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", ["fastgrnn", "gru", "lstm"])
@pytest.mark.parametrize("patch", [(4, 4), (3, 5)])
def test_fast_operator_equals_literal_algorithm_1(cell, patch):
    pool = randomize(RNNPool(3, 5, 4, cell=cell), seed=7)
    patches = torch.randn(4, 3, *patch)
    with torch.no_grad():
        torch.testing.assert_close(pool(patches), ref.rnnpool_operator(pool, patches), rtol=1e-5, atol=1e-5)


def test_output_order_rows_then_columns():
    # A patch whose columns are constant has identical rows: the row summaries equal each other, so
    # rows fwd == rows bwd; the column summaries differ, so cols fwd != cols bwd.
    pool = randomize(RNNPool(1, 4, 3), seed=1)
    patch = torch.arange(5.0).repeat(5, 1)[None, None] / 5  # value depends on the column only
    out = pool(patch).detach()[0]
    torch.testing.assert_close(out[0:3], out[3:6])
    assert not torch.allclose(out[6:9], out[9:12])


def test_parameter_count_formula():
    c, h1, h2 = 8, 16, 12
    pool = RNNPool(c, h1, h2)
    expected = (c * h1 + h1 * h1 + 2 * h1 + 2) + (h1 * h2 + h2 * h2 + 2 * h2 + 2)
    assert sum(p.numel() for p in pool.parameters()) == expected


def test_gradients_reach_every_parameter():
    # (randomised: at the default zeta=100, nu=-100 their sigmoids saturate and the gradients underflow)
    layer = randomize(RNNPoolLayer(3, 4, 5, 4, 2), seed=0)
    layer(torch.randn(2, 3, 10, 10)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.fixture(params=["numba", "torch"])
def fastgrnn_path(request, monkeypatch) -> str:
    """Run a test through FastGRNNCell.sweep's numba kernel and through its torch fallback."""
    if request.param == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(rnn_cells, "_numba_kernels", lambda: None)
    return request.param


def test_fastgrnn_sweep_gradcheck_float64(fastgrnn_path):
    # the hand-written backward of the batched FastGRNN sweep, on every parameter and the input
    layer = randomize(RNNPoolLayer(2, 3, 2, 3, 2, padding="valid"), seed=11).double()
    names = [name for name, _ in layer.named_parameters()]
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)

    def run(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(run, (x, *layer.parameters()), fast_mode=True)


def test_fast_gradients_equal_literal_algorithm_1(fastgrnn_path):
    layer = randomize(RNNPoolLayer(3, 5, 4, (4, 3), (2, 2), padding="same"), seed=12)
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 16, 5, 4, generator=torch.Generator().manual_seed(4))
    grads = []
    for forward in (layer, lambda x: ref.rnnpool_layer(layer, x)):
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        (forward(xg) * weights).sum().backward()
        grads.append([xg.grad] + [p.grad.clone() for p in layer.parameters()])
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def sweep_with_grads(cell: FastGRNNCell, sequences: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Final states of cell.sweep, then the gradients (inputs, parameters) of a random weighting of them."""
    cell.zero_grad()
    sequences = [seq.clone().requires_grad_() for seq in sequences]
    finals = cell.sweep(sequences)
    g = torch.Generator().manual_seed(seed)
    sum((f * torch.randn(f.shape, generator=g)).sum() for f in finals).backward()
    return [f.detach() for f in finals] + [s.grad for s in sequences] + [p.grad for p in cell.parameters()]


# (steps, sequence shapes [..., C] after the time axis, cell kwargs): T=1; 263 sequences, more than a block
# and not a multiple of the block or thread counts; low-rank and sparse weights
KERNEL_CASES = [
    (1, [(3, 3), (2, 5, 3)], {}),
    (5, [(131, 3), (4, 33, 3)], {"w_rank": 2, "u_sparsity": 0.5}),
]


@pytest.mark.parametrize(("steps", "shapes", "kwargs"), KERNEL_CASES)
def test_fastgrnn_kernel_equals_torch_sweep(monkeypatch, steps, shapes, kwargs):
    pytest.importorskip("numba")
    cell = randomize(FastGRNNCell(3, 6, **kwargs), seed=steps)
    g = torch.Generator().manual_seed(steps)
    sequences = [torch.randn(steps, *shape, generator=g) for shape in shapes]
    kernel = sweep_with_grads(cell, sequences, seed=1)
    monkeypatch.setattr(rnn_cells, "_numba_kernels", lambda: None)
    for fast, slow in zip(kernel, sweep_with_grads(cell, sequences, seed=1), strict=True):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_fastgrnn_cell_equations():
    cell = randomize(FastGRNNCell(3, 4), seed=3)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    pre = x @ cell.W + h @ cell.U
    z = torch.sigmoid(pre + cell.bias_gate)
    c = torch.tanh(pre + cell.bias_update)
    expected = z * h + (torch.sigmoid(cell.zeta) * (1 - z) + torch.sigmoid(cell.nu)) * c
    torch.testing.assert_close(cell(x, h), expected)


def test_fastgrnn_init_and_rnnpool_zeta_nu():
    cell = FastGRNNCell(3, 4)
    assert torch.equal(cell.bias_gate, torch.ones(1, 4)) and cell.zeta.item() == 1 and cell.nu.item() == -4
    pool = RNNPool(3, 4, 4)
    assert pool.rnn1.zeta.item() == 100 and pool.rnn2.nu.item() == -100


def test_quantised_nonlinearities():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 3.0])
    torch.testing.assert_close(quant_sigmoid(x), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(quant_tanh(x), torch.tensor([-1.0, -1.0, 0.0, 0.5, 1.0]))
    cell = FastGRNNCell(2, 3, gate_nonlinearity="quantSigm", update_nonlinearity="quantTanh")
    x, h = torch.randn(4, 2), torch.randn(4, 3)
    pre = x @ cell.W + h @ cell.U
    z, c = quant_sigmoid(pre + cell.bias_gate), quant_tanh(pre + cell.bias_update)
    torch.testing.assert_close(
        cell(x, h), z * h + (torch.sigmoid(cell.zeta) * (1 - z) + torch.sigmoid(cell.nu)) * c
    )


def test_low_rank_factors():
    cell = FastGRNNCell(10, 8, w_rank=2, u_rank=3)
    assert cell.W is None and cell.W1.shape == (10, 2) and cell.U2.shape == (3, 8)
    assert sum(p.numel() for p in cell.parameters()) == 10 * 2 + 2 * 8 + 8 * 3 + 3 * 8 + 2 * 8 + 2
    assert torch.linalg.matrix_rank(cell.weight_w()).item() == 2


def test_sparsity_mask_keeps_top_fraction_through_training():
    cell = FastGRNNCell(10, 10, w_sparsity=0.3, u_sparsity=0.5)
    w = cell.W.detach().abs()
    assert cell.w_mask.sum().item() == 30 and cell.u_mask.sum().item() == 50
    assert w[cell.w_mask.bool()].min() >= w[~cell.w_mask.bool()].max()
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        cell(torch.randn(4, 10)).sum().backward()
        assert (cell.W.grad[~cell.w_mask.bool()] == 0).all()
        optimizer.step()
    effective = cell.weight_w()
    assert (effective[~cell.w_mask.bool()] == 0).all() and (effective != 0).sum().item() == 30


@pytest.mark.parametrize(("ours", "theirs"), [(GRUCell, nn.GRUCell), (LSTMCell, nn.LSTMCell)])
def test_gru_and_lstm_match_torch(ours, theirs):
    cell = ours(3, 5)
    reference = theirs(3, 5)
    reference.load_state_dict(cell.state_dict())
    x = torch.randn(4, 3)
    state = cell(x)
    expected = reference(x)
    torch.testing.assert_close(cell.output(state), expected[0] if isinstance(expected, tuple) else expected)
    state = cell(x, state)
    expected = reference(x, expected)
    torch.testing.assert_close(cell.output(state), expected[0] if isinstance(expected, tuple) else expected)


def test_onnx_export_matches(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    layer = randomize(RNNPoolLayer(4, 6, 5, 4, 3), seed=2).eval()
    x = torch.randn(1, 4, 13, 13)
    path = tmp_path / "rnnpool.onnx"
    torch.onnx.export(layer, (x,), str(path), input_names=["x"], dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), layer(x).detach(), rtol=1e-5, atol=1e-5)


def test_torch_compile_matches():
    layer = randomize(RNNPoolLayer(2, 3, 3, 3, 2), seed=4).eval()
    x = torch.randn(1, 2, 7, 7)
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_torch_compile_of_inference_keeps_the_numba_sweeps():
    """Without gradients torch.compile calls the in-place kernel path as one opaque operator
    (leanvision::rnnpool_in_place) in a single graph, instead of tracing the plain steps."""
    pytest.importorskip("numba")
    layer = randomize(RNNPoolLayer(3, 4, 5, (4, 3), (2, 3)), seed=5).eval()
    x = torch.randn(2, 3, 17, 14)
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(layer, backend=backend, fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x))
    (graph,) = graphs
    assert "leanvision.rnnpool_in_place" in str(graph.graph)


def test_bad_input():
    layer = RNNPoolLayer(3, 4, 4, 6, 4)
    with pytest.raises(ValueError, match=r"expects input \[B, 3, H, W\], got \[1, 2, 10, 10\]"):
        layer(torch.randn(1, 2, 10, 10))
    with pytest.raises(ValueError, match="patch 6x6 is larger than the 5x10 input"):
        layer(torch.randn(1, 3, 5, 10))
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        RNNPoolLayer(3, 4, 4, 0, 4)
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        RNNPool(3, 4, 0)
    with pytest.raises(ValueError, match="padding must be one of"):
        RNNPoolLayer(3, 4, 4, 6, 4, padding="reflect")
    with pytest.raises(ValueError, match="unknown cell"):
        create_cell("rnn", 3, 4)
    with pytest.raises(ValueError, match=r"expects patches \[N, 3, kh, kw\]"):
        RNNPool(3, 4, 4)(torch.randn(2, 4, 6, 6))


def test_edgeml_state_dict_errors():
    state, _ = load_golden("rnnpool_patches_c8_h8_k6.npz")
    with pytest.raises(ValueError, match="missing.*cell_bidirrnn.cell.W"):
        RNNPool.from_edgeml({k: v for k, v in state.items() if k != "cell_bidirrnn.cell.W"})
    broken = dict(state)
    broken["cell_bidirrnn.cell.W"] = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="RNN2 input size 5 != RNN1 hidden size 8"):
        RNNPool.from_edgeml(broken)
    broken = dict(state)
    broken["cell_rnn.cell.U"] = torch.zeros(8, 7)
    with pytest.raises(ValueError, match=r"'U' has shape \[8, 7\], expected \[8, 8\]"):
        RNNPool.from_edgeml(broken)


def test_bands_of_output_rows_equal_one_pass(monkeypatch):
    import leanvision.layers.rnnpool as rnnpool

    layer = randomize(RNNPoolLayer(3, 4, 5, (4, 3), (2, 3)), seed=9)
    x = torch.randn(2, 3, 17, 14)
    whole = layer(x).detach()  # with gradients: the gathered sweeps, in tiles
    for tile in ("TILE_PATCHES", "FUSED_TILE_PATCHES"):  # 2 images x 4 columns: bands of one row
        monkeypatch.setattr(rnnpool, tile, 5)
    torch.testing.assert_close(layer(x).detach(), whole)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "patch, stride, size", [((8, 8), (4, 4), (37, 29)), ((4, 3), (2, 3), (17, 14)), ((3, 5), (4, 2), (9, 20))]
)
def test_inference_sweeps_in_place_equal_the_gathered_ones(patch, stride, size, channels_last):
    """Without gradients FastGRNN's sweeps read their steps in place over the whole map (rnnpool_indices);
    with them, from gathered copies of the segments: the same numbers."""
    pytest.importorskip("numba")
    layer = randomize(RNNPoolLayer(3, 4, 5, patch, stride), seed=3)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gathered = layer(x).detach()
    with torch.no_grad():
        in_place = layer(x)
    torch.testing.assert_close(in_place, gathered, rtol=1e-6, atol=1e-6)
    assert in_place.is_contiguous()


def renet_literal(layer, x: torch.Tensor) -> torch.Tensor:
    """ReNet one sequence at a time through the cells' plain one-step forward."""
    p = layer.patch_size
    hp, wp = x.shape[2] // p, x.shape[3] // p

    def run(cell, vectors):
        state, out = None, []
        for v in vectors:
            state = cell(v[None], state)
            out.append(cell.output(state)[0])
        return out

    out = torch.zeros(x.shape[0], layer.out_channels, hp, wp)
    for b in range(x.shape[0]):
        patch = [
            [x[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p].flatten() for j in range(wp)]
            for i in range(hp)
        ]
        vertical = [[None] * wp for _ in range(hp)]
        for j in range(wp):
            column = [patch[i][j] for i in range(hp)]
            down, up = run(layer.down, column), run(layer.up, column[::-1])[::-1]
            for i in range(hp):
                vertical[i][j] = torch.cat([down[i], up[i]])
        for i in range(hp):
            right, left = run(layer.right, vertical[i]), run(layer.left, vertical[i][::-1])[::-1]
            for j in range(wp):
                out[b, :, i, j] = torch.cat([right[j], left[j]])
    return out


@pytest.mark.parametrize("cell", ["gru", "fastgrnn"])
def test_renet_equals_literal_sweeps(cell):
    from leanvision.layers.renet import ReNetLayer

    layer = randomize(ReNetLayer(3, hidden=4, patch_size=2, cell=cell), seed=5)
    x = torch.randn(2, 3, 8, 6)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (2, 8, 4, 3)
        torch.testing.assert_close(out, renet_literal(layer, x), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_renet_sized_like_rnnpool_and_bad_input():
    from leanvision.layers.renet import ReNetLayer

    h2 = 8
    renet, rnnpool = ReNetLayer(8, hidden=2 * h2, patch_size=4), RNNPoolLayer(8, 8, h2, 6, 4)
    x = torch.randn(1, 8, 112, 112)
    assert renet(x).shape == rnnpool(x).shape[:2] + (28, 28)  # 4 * h2 channels at the same 28x28 grid
    with pytest.raises(ValueError, match=r"expects input \[B, 8, H, W\]"):
        renet(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="patch 4x4 is larger than the 3x16 input"):
        renet(torch.randn(1, 8, 3, 16))
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        ReNetLayer(8, 4, 0)
