"""Wanda, SparseGPT, GPTQ and SmoothQuant against small dense references (pure tensors)."""

import pytest
import torch

from edgeslim.core.errors import ConfigError
from edgeslim.prune.sparsegpt import SparseGPT, sparsegpt_prune_
from edgeslim.prune.wanda import Wanda, is_nm, nm_mask, row_mask, wanda_mask, wanda_scores
from edgeslim.quant.gptq import GPTQ, dequantize, gptq_quantize, grid_params, rtn_quantize
from edgeslim.quant.smoothquant import SmoothQuant, smoothing_factors


def _problem(out_f=12, in_f=16, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g) @ mix  # correlated inputs
    x[:, 3] *= 8  # one outlier feature
    w = torch.randn(out_f, in_f, generator=g)
    h = (2 / tokens) * (x.t() @ x)
    return w.double(), x.double(), h.double()


def _err(w0, w1, x):
    return float(((w0 - w1) @ x.t()).pow(2).sum())


def sequential_reference(w0, h, fix):
    """Dense reference of the OBS column sweep: fix column i with ``fix(w, i)``, then choose
    the remaining columns by an explicit least-squares solve given columns 0..i fixed."""
    w = w0.clone()
    n = w.shape[1]
    for i in range(n):
        w[:, i] = fix(w, i)
        if i + 1 < n:
            f, r = slice(0, i + 1), slice(i + 1, n)
            rhs = ((w0[:, f] - w[:, f]) @ h[f, r]).t()  # (rest, out)
            w[:, r] = w0[:, r] + torch.linalg.solve(h[r, r], rhs).t()
    return w


# --- Wanda --------------------------------------------------------------------------------


def test_wanda_scores_and_row_mask_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    sq = torch.tensor([4.0, 1.0, 0.25, 16.0])  # norms 2, 1, 0.5, 4
    assert torch.equal(wanda_scores(w, sq), torch.tensor([[2.0, 2, 1.5, 2], [8, 1, 0.5, 8]]))
    keep = row_mask(wanda_scores(w, sq), 0.5)
    # row 0 scores [2, 2, 1.5, 2]: drop 1.5 and the first 2 (stable); row 1 drops 0.5 and 1
    assert keep.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert keep.sum(1).tolist() == [2, 2]  # compared within each output row


def test_wanda_differs_from_magnitude_because_of_activations():
    w = torch.tensor([[1.0, 2.0]])
    assert row_mask(w.abs(), 0.5).tolist() == [[False, True]]
    assert wanda_mask(w, torch.tensor([100.0, 1.0]), Wanda(sparsity=0.5)).tolist() == [
        [True, False]
    ]


def test_nm_mask_valid_and_keeps_the_best():
    scores = torch.rand(8, 32, generator=torch.Generator().manual_seed(1))
    keep = nm_mask(scores, 2, 4)
    assert is_nm(keep, 2, 4) and keep.sum() == 8 * 16
    groups = scores.reshape(8, 8, 4)
    kept = groups[keep.reshape(8, 8, 4)].reshape(8, 8, 2)
    dropped = groups[~keep.reshape(8, 8, 4)].reshape(8, 8, 2)
    assert (kept.min(2).values >= dropped.max(2).values).all()
    with pytest.raises(Exception, match="divisible by 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_one_shot_prune_config_validation():
    assert Wanda(sparsity=0.5).target == "50%" and Wanda(n=2, m=4).target == "2:4"
    for bad in (
        {},
        {"n": 2},
        {"sparsity": 0.5, "n": 2, "m": 4},
        {"n": 4, "m": 4},
        {"sparsity": 1.0},
        {"sparsity": 0.5, "unknown": 1},
    ):
        with pytest.raises(ConfigError):
            Wanda(**bad)
    with pytest.raises(ConfigError):
        SparseGPT(sparsity=0.5, percdamp=0)


# --- SparseGPT ----------------------------------------------------------------------------


def test_sparsegpt_fixed_mask_equals_sequential_least_squares_reference():
    w, _x, h = _problem()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    ours = w.clone()
    sparsegpt_prune_(ours, h, mask=keep, blocksize=5, percdamp=1e-10)
    ref = sequential_reference(w, h, lambda cur, i: cur[:, i] * keep[:, i])
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ours[~keep] == 0).all()


def test_sparsegpt_close_to_the_optimal_solve_and_far_better_than_magnitude():
    w, x, h = _problem(out_f=24, in_f=32, tokens=400)
    ours = w.clone()
    keep = sparsegpt_prune_(ours, h, sparsity=0.5, blocksize=32)
    assert abs(float(keep.float().mean()) - 0.5) < 1e-9
    # optimal reconstruction for the same mask: per row, solve H_KK v = H_K: w
    best = torch.zeros_like(w)
    for r in range(w.shape[0]):
        k = keep[r]
        best[r, k] = torch.linalg.solve(h[k][:, k], h[k] @ w[r])
    magnitude = w * row_mask(w.abs(), 0.5)
    e_ours, e_best, e_mag = _err(w, ours, x), _err(w, best, x), _err(w, magnitude, x)
    assert e_best <= e_ours <= 2 * e_best  # sequential: later columns cannot help earlier ones
    assert e_ours < 0.5 * e_mag


def test_sparsegpt_nm_is_valid_and_beats_wanda_mask_without_update():
    w, x, h = _problem(out_f=16, in_f=32, tokens=400)
    ours = w.clone()
    keep = sparsegpt_prune_(ours, h, n=2, m=4, blocksize=8)
    assert is_nm(keep, 2, 4) and int(keep.sum()) == 16 * 16
    assert (ours[~keep] == 0).all()
    wanda = w * wanda_mask(w, x.pow(2).sum(0), Wanda(n=2, m=4))
    assert _err(w, ours, x) < _err(w, wanda, x)
    with pytest.raises(Exception, match="Hessian shape"):
        sparsegpt_prune_(w.clone(), h[:4, :4], sparsity=0.5)


# --- GPTQ ---------------------------------------------------------------------------------


def test_grid_and_rtn_are_exact_and_stored_integers_reproduce_the_weight():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scale, zero = grid_params(w, 2)
    assert scale.tolist() == [1.0] and zero.tolist() == [1.0]  # grid {-1, 0, 1, 2}
    qw = rtn_quantize(torch.randn(6, 20), bits=4, group_size=8)
    assert qw.scale.shape == (6, 3) and qw.scale.dtype == torch.float16
    assert qw.g_idx.tolist() == [i // 8 for i in range(20)]
    g = qw.g_idx.long()
    rebuilt = qw.scale.float()[:, g] * (qw.codes.float() - qw.zero.float()[:, g])
    assert torch.equal(rebuilt, qw.weight)
    row = dequantize(qw.codes[:, :8].float(), qw.scale[:, 0].float(), qw.zero[:, 0].float())
    assert torch.equal(row, qw.weight[:, :8])
    assert int(qw.codes.max()) <= 15


def test_gptq_equals_sequential_reference_and_rtn_when_h_is_diagonal():
    w, _x, h = _problem(out_f=8, in_f=16)
    qw = gptq_quantize(w.float(), h, bits=3, group_size=4, blocksize=4, percdamp=1e-10)
    state = {}

    def fix(cur, i):
        if i % 4 == 0:
            state["grid"] = grid_params(cur[:, i : i + 4], 3)
        s, z = state["grid"]
        return s * (torch.clamp(torch.round(cur[:, i] / s) + z, 0, 7) - z)

    ref = sequential_reference(w, h, fix)
    assert torch.allclose(qw.weight.double(), ref, atol=1e-4)
    diag = torch.diag(torch.diag(h))
    assert torch.equal(
        gptq_quantize(w.float(), diag, bits=4, group_size=8).weight,
        rtn_quantize(w.float(), bits=4, group_size=8).weight,
    )


def test_gptq_beats_rtn_with_act_order_and_groups():
    w, x, h = _problem(out_f=32, in_f=64, tokens=500)
    for act_order in (False, True):
        qw = gptq_quantize(w.float(), h, bits=4, group_size=16, act_order=act_order)
        rtn = rtn_quantize(w.float(), bits=4, group_size=16)
        assert _err(w, qw.weight.double(), x) < 0.7 * _err(w, rtn.weight.double(), x)
        g = qw.g_idx.long()
        rebuilt = qw.scale.float()[:, g] * (qw.codes.float() - qw.zero.float()[:, g])
        assert torch.equal(rebuilt, qw.weight)
        assert torch.bincount(qw.g_idx.long()).tolist() == [16] * 4
    with pytest.raises(ConfigError):
        GPTQ(bits=1)
    with pytest.raises(ConfigError):
        GPTQ(bits=4, group_size=0)


# --- SmoothQuant --------------------------------------------------------------------------


def test_smoothing_factors_formula():
    act = torch.tensor([16.0, 1.0])
    w = torch.tensor([[1.0, 4.0], [-2.0, 1.0]])  # column maxima 2, 4
    s = smoothing_factors(act, [w], alpha=0.5)
    assert torch.allclose(s, torch.tensor([16**0.5 / 2**0.5, 1 / 4**0.5]))
    assert torch.allclose(smoothing_factors(act, [w], alpha=1.0), act)
    with pytest.raises(ConfigError):
        SmoothQuant(alpha=1.5)
