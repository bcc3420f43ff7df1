"""GPTQ: weight-only quantization with second-order error compensation (and RTN beside it).

Elias Frantar, Saleh Ashkboos, Torsten Hoefler, Dan Alistarh. "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023.
https://arxiv.org/abs/2210.17323

Each linear layer's weights W (out, in) are quantized one input column at a time to an
asymmetric ``bits``-bit grid (one scale and zero point per row and group of ``group_size``
inputs); the rounding error of column i is spread over the columns not yet quantized with the
upper Cholesky factor U of the damped inverse Hessian (H + damp I)^-1, H = 2/n X^T X::

    err      = (w_i - quant(w_i)) / U_ii
    W[:, i:] -= err (outer) U[i, i:]

with lazy batch updates per ``blocksize`` columns (as in :mod:`edgeslim.prune.sparsegpt`).
A group's scale and zero point are computed from the (already updated) weights when its first
column is reached. ``act_order`` quantizes columns in order of decreasing H_jj; groups are then
consecutive in that order and ``g_idx`` records each input's group.

Round-to-nearest (:class:`RTN`) uses the same grid without any update: the baseline.

Scales are rounded to float16 *before* quantizing, so the stored int codes, scales and zero
points reproduce the model's weights exactly: ``W = scale[g] * (code - zero[g])``. A quantized
layer keeps its dequantized weights (it runs as an ordinary float model) plus the buffers
``weight_qscale`` (out, groups) float16, ``weight_qzero`` (out, groups) uint8,
``weight_qgidx`` (in,) int32 and ``weight_qbits`` (a scalar), the format of
:mod:`.weightonly`, from which :mod:`edgeslim.core.models.hf` writes packed integer weights.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import ConfigDict, Field
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.linear import linear_layers, weight_matrix
from edgeslim.core.models.quantstate import QuantizedWeight, attach_quantized_
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.core.selection import layer_filter
from edgeslim.oneshot.blocks import find_blocks
from edgeslim.oneshot.engine import ONE_SHOT_TAKES, one_shot_
from edgeslim.oneshot.registry import OneShotAlgorithm, register
from edgeslim.oneshot.stats import Hessian, damped_inverse_cholesky
from edgeslim.quant.registry import REGISTRY, returning_model


class RTN(Options):
    """Round-to-nearest weight-only quantization (the baseline GPTQ is compared with)."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, ge=2, le=8, description="bits per weight")
    group_size: int | None = Field(128, ge=1, description="inputs per scale; None: per row")
    sym: bool = Field(False, description="symmetric grid (zero point in the middle)")
    exclude: list[str] = Field(default_factory=list, description="glob patterns left in float")


class GPTQ(RTN):
    """GPTQ (Frantar et al. 2022): quantize column by column, compensating with H^-1."""

    needs_calib: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return f"gptq int{self.bits} g{self.group_size}"

    act_order: bool = Field(False, description="quantize columns by decreasing H_jj")
    blocksize: int = Field(128, ge=1, description="columns per lazy batch update")
    percdamp: float = Field(0.01, gt=0, description="damping, as a share of mean(diag H)")
    batch_size: int = Field(8, ge=1, description="calibration batch size")


# --------------------------------------------------------------------------------------
# the grid (pure functions)
# --------------------------------------------------------------------------------------


def grid_params(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-exact) and zero point per row of ``w`` (rows, cols): min-max grid."""
    maxq = 2**bits - 1
    lo = torch.clamp(w.amin(1), max=0)  # (rows,) the grid always holds 0
    hi = torch.clamp(w.amax(1), min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (hi - lo) == 0
    lo, hi = torch.where(flat, -torch.ones_like(lo), lo), torch.where(flat, torch.ones_like(hi), hi)
    scale = ((hi - lo) / maxq).to(torch.float16).to(w.dtype)  # stored as float16
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-14), scale)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero.clamp(0, maxq)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """Integer codes in [0, 2^bits - 1] of ``w`` (rows, ...) with per-row scale and zero."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.reshape(shape)) + zero.reshape(shape)
    return q.clamp(0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)`` with per-row ``scale``/``zero``."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    return scale.reshape(shape) * (q - zero.reshape(shape))


def _groups(in_f: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-in_f // group_size)


def rtn_quantize(
    w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = False
) -> QuantizedWeight:
    """Round-to-nearest of ``w`` (out, in) on the grid of each row and group."""
    w = w.float()
    _out_f, in_f = w.shape
    g = group_size or in_f
    g_idx = (torch.arange(in_f, device=w.device) // g).int()
    scales, zeros = [], []
    for start in range(0, in_f, g):
        s, z = grid_params(w[:, start : start + g], bits, sym)
        scales.append(s)
        zeros.append(z)
    scale, zero = torch.stack(scales, 1), torch.stack(zeros, 1)  # (out, groups)
    s_full, z_full = scale[:, g_idx.long()], zero[:, g_idx.long()]  # (out, in)
    codes = torch.clamp(torch.round(w / s_full) + z_full, 0, 2**bits - 1)
    deq = s_full * (codes - z_full)
    return QuantizedWeight(
        deq, codes.to(torch.uint8), scale.half(), zero.to(torch.uint8), g_idx, bits
    )


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    *,
    sym: bool = False,
    act_order: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    keep: torch.Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ of ``w`` (out, in) with Hessian ``h`` (in, in); ``w`` itself is not changed.

    ``keep`` (out, in) bool: a pruning mask to preserve. Pruned weights are "quantized" to
    exactly 0 (the code of the zero point) and their error is compensated like any other,
    which is SparseGPT's joint sparsify-and-quantize. Runs on ``w``'s device (``h`` and
    ``keep`` are moved there); every returned tensor is on that device.
    """
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ConfigError(f"Hessian shape {tuple(h.shape)} does not fit weight {(out_f, in_f)}")
    device = w.device
    work = w.float().clone()
    h = h.to(device)
    arange = torch.arange(in_f, device=device)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else arange
    work, h = work[:, perm], h[perm][:, perm]
    if keep is None:
        kept = torch.ones(out_f, in_f, dtype=torch.bool, device=device)
    else:
        kept = keep.to(device).bool()[:, perm]
    u = damped_inverse_cholesky(h, work, percdamp).float()  # (in, in) upper
    g = group_size or in_f
    n_groups = _groups(in_f, group_size)
    scale = torch.zeros(out_f, n_groups, device=device)
    zero = torch.zeros(out_f, n_groups, device=device)
    codes_t = torch.zeros(in_f, out_f, device=device)  # (in, out): codes of column j in row j
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        # the block's columns held as contiguous rows (b, out), as in SparseGPT: the same
        # arithmetic element by element, on whole rows
        w1t = work[:, i1:i2].t().contiguous()  # (b, out)
        u1 = u[i1:i2, i1:i2]
        err1t = torch.zeros_like(w1t)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a new group: its grid from the current (updated) weights
                grp = col // g
                cols = torch.cat([w1t[i:].t(), work[:, i2:]], 1)[:, : min(g, in_f - col)]
                s, z = grid_params(cols * kept[:, col : col + cols.shape[1]], bits, sym)
                scale[:, grp], zero[:, grp] = s, z
            grp = col // g
            s, z = scale[:, grp], zero[:, grp]
            q = torch.where(kept[:, col], quantize_codes(w1t[i], s, z, bits), z)  # (out,)
            deq = dequantize(q, s, z)
            codes_t[col] = q
            err = (w1t[i] - deq) / u1[i, i]
            w1t[i:] -= u1[i, i:].unsqueeze(1) @ err.unsqueeze(0)
            w1t[i] = deq
            err1t[i] = err
        work[:, i1:i2] = w1t.t()
        work[:, i2:] -= err1t.t().contiguous() @ u[i1:i2, i2:]
    inv = torch.argsort(perm)
    g_idx = (arange // g)[inv].int()  # group of each original input
    codes = codes_t.t()[:, inv]
    s_full = scale.float()[:, g_idx.long()]
    z_full = zero.float()[:, g_idx.long()]
    deq = s_full * (codes.float() - z_full)  # exactly what the stored integers give
    return QuantizedWeight(
        deq, codes.to(torch.uint8), scale.half(), zero.to(torch.uint8), g_idx, bits
    )


# --------------------------------------------------------------------------------------
# the algorithm, as the layer-by-layer engine sees it
# --------------------------------------------------------------------------------------


def _keep_matrix(module: nn.Module) -> torch.Tensor | None:
    """The layer's pruning mask as (out, in), or None: quantization keeps pruned weights 0."""
    keep = getattr(module, "weight_keep", None)
    if keep is None:
        return None
    return keep.t() if type(module).__name__ == "Conv1D" else keep


class GPTQAlgorithm(OneShotAlgorithm):
    """Collect H per layer; GPTQ-quantize each layer."""

    stats_type = Hessian
    cfg: GPTQ

    def compress_layer(self, name: str, module: nn.Module, stats: Hessian) -> float:
        cfg = self.cfg
        w = weight_matrix(module)
        qw = gptq_quantize(
            w,
            stats.h,
            cfg.bits,
            cfg.group_size,
            sym=cfg.sym,
            act_order=cfg.act_order,
            blocksize=cfg.blocksize,
            percdamp=cfg.percdamp,
            keep=_keep_matrix(module),
        )
        attach_quantized_(module, qw)
        return float((qw.weight - w).pow(2).mean())


def rtn_quantize_(model: nn.Module, cfg: RTN, ctx: Context) -> dict[str, float]:
    """Round-to-nearest the same layers GPTQ would quantize; returns each one's weight MSE.

    No calibration data is needed (``calib`` is ignored).
    """
    keep = layer_filter(cfg.exclude, ctx.filter_fn)
    found = find_blocks(model)
    prefix, root = found if found is not None else ("", model)
    log = {}
    for name, module in linear_layers(root, prefix, keep).items():
        w = weight_matrix(module)  # a pruned weight is 0 and the grid holds 0 exactly
        qw = rtn_quantize(w, cfg.bits, cfg.group_size, cfg.sym)
        attach_quantized_(module, qw)
        log[name] = float((qw.weight - w).pow(2).mean())
    if not log:
        raise ConfigError(f"rtn: no linear layer was selected in {type(model).__name__}")
    return log


register(GPTQ, GPTQAlgorithm)

__all__ = [
    "GPTQ",
    "RTN",
    "gptq_quantize",
    "rtn_quantize",
    "rtn_quantize_",
]

REGISTRY.register("gptq", GPTQ, returning_model(one_shot_), takes=ONE_SHOT_TAKES)
REGISTRY.register(
    "rtn", RTN, returning_model(rtn_quantize_), takes=("calib", "filter_fn", "progress")
)
