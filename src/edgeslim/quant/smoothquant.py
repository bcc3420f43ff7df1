"""SmoothQuant: move activation outliers into the weights, then quantize both to int8 (W8A8).

Guangxuan Xiao, Ji Lin, Mickael Seznec, Hao Wu, Julien Demouth, Song Han. "SmoothQuant:
Accurate and Efficient Post-Training Quantization for Large Language Models", ICML 2023.
https://arxiv.org/abs/2211.10438

A few input channels of a transformer's linear layers carry values 100x larger than the rest,
which ruins a per-tensor int8 grid for activations. SmoothQuant divides each input channel j
by a smoothing factor and multiplies the matching weight column by it, which leaves the
product unchanged::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)       Y = (X diag(s)^-1) (diag(s) W^T)

The division is folded into the LayerNorm (or RMSNorm) that produces X, so it costs nothing at
run time; layers whose input does not come straight from a norm (attention output, second
MLP layer) are quantized without smoothing, as in the paper.

Quantization here is W8A8 in simulation: weights symmetric int8 per output channel (kept as
their dequantized values plus the buffers of :mod:`.weightonly`, one group per row), activations
symmetric int8 per tensor with a *static* scale calibrated on the same data
(``input_qscale``, applied by a forward pre-hook that rounds the layer's input).
``smooth=False`` is naive W8A8, the baseline.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import ConfigDict, Field
from torch import nn

from edgeslim.core.linear import set_weight_matrix_, weight_matrix
from edgeslim.core.models.quantstate import QuantizedWeight, attach_act_quant_, attach_quantized_
from edgeslim.core.options import Options
from edgeslim.oneshot.engine import ONE_SHOT_TAKES, one_shot_
from edgeslim.oneshot.registry import OneShotAlgorithm, register
from edgeslim.oneshot.stats import InputAbsMax
from edgeslim.quant.registry import REGISTRY, returning_model

# Which norm feeds which linear layers, inside one pre-LN block. The norm's output must feed
# nothing else: in a post-LN block (BERT) it is also the residual, so nothing is folded there.
NORM_FEEDS: dict[str, list[tuple[str, list[str]]]] = {
    "GPT2Block": [("ln_1", ["attn.c_attn"]), ("ln_2", ["mlp.c_fc"])],
    "OPTDecoderLayer": [
        ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("final_layer_norm", ["fc1"]),
    ],
    "LlamaDecoderLayer": [
        ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ],
}


class SmoothQuant(Options):
    """SmoothQuant W8A8 (Xiao et al. 2022); ``smooth=False`` gives naive W8A8."""

    model_config = ConfigDict(extra="forbid")
    needs_calib: ClassVar[bool] = True

    alpha: float = Field(0.5, ge=0, le=1, description="migration strength")
    smooth: bool = Field(True, description="False: naive W8A8 (no scale migration)")
    weight_bits: int = Field(8, ge=2, le=8)
    act_bits: int = Field(8, ge=2, le=8)
    exclude: list[str] = Field(default_factory=list, description="glob patterns left in float")
    batch_size: int = Field(8, ge=1, description="calibration batch size")

    @property
    def label(self) -> str:
        return f"smoothquant a={self.alpha}" if self.smooth else "naive w8a8"


# --------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------


def smoothing_factors(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); ``weights`` are (out, in) sharing input j."""
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)  # (in,)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def symmetric_quantize(w: torch.Tensor, bits: int) -> QuantizedWeight:
    """Symmetric per-output-channel quantization of ``w`` (out, in), scale max|w_i| / qmax.

    Stored like GPTQ's grid with one group per row: codes ``round(w / s) + 2^(b-1)`` (so
    code 2^(b-1) is zero) and a float16 scale.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(1) / qmax).clamp(min=2.0**-14).half().float()  # (out,)
    zero = torch.full_like(scale, qmax + 1)
    codes = torch.clamp(torch.round(w / scale.unsqueeze(1)), -qmax, qmax) + zero.unsqueeze(1)
    deq = scale.unsqueeze(1) * (codes - zero.unsqueeze(1))
    g_idx = torch.zeros(w.shape[1], dtype=torch.int32, device=w.device)
    return QuantizedWeight(
        deq,
        codes.to(torch.uint8),
        scale.half()[:, None],
        zero.to(torch.uint8)[:, None],
        g_idx,
        bits,
    )


# --------------------------------------------------------------------------------------
# static activation quantization: a pre-hook that rounds a layer's input
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# the algorithm, as the layer-by-layer engine sees it
# --------------------------------------------------------------------------------------


@torch.no_grad()
def smooth_block_(
    block: nn.Module,
    layers: dict[str, nn.Module],
    stats: dict[str, InputAbsMax],
    alpha: float,
) -> dict[str, torch.Tensor]:
    """Fold smoothing factors into the norms of ``block``; returns s per smoothed layer name.

    ``stats[name].absmax`` of the smoothed layers is divided by s (their new input range).
    """
    modules = dict(block.named_modules())
    done: dict[str, torch.Tensor] = {}
    for norm_name, linear_names in NORM_FEEDS.get(type(block).__name__, []):
        norm = modules.get(norm_name)
        fulls = [next((f for f in layers if f.endswith("." + n)), None) for n in linear_names]
        if norm is None or any(f is None for f in fulls):
            continue  # a layer of the group is excluded: leave the group unsmoothed
        act = torch.stack([stats[f].absmax.to(norm.weight.device) for f in fulls]).amax(0)
        s = smoothing_factors(act, [weight_matrix(layers[f]) for f in fulls], alpha)
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
        for f in fulls:
            set_weight_matrix_(layers[f], weight_matrix(layers[f]) * s.unsqueeze(0))
            stats[f].absmax = stats[f].absmax / s
            done[f] = s
    return done


class SmoothQuantAlgorithm(OneShotAlgorithm):
    """Collect max|X_j| per layer; smooth the block (optionally), then quantize each layer's
    weights and inputs."""

    stats_type = InputAbsMax
    cfg: SmoothQuant

    def __init__(self, cfg: SmoothQuant):
        super().__init__(cfg)
        self.smoothed: dict[str, torch.Tensor] = {}  # of the block being compressed

    @torch.no_grad()
    def prepare_block(
        self, block: nn.Module, layers: dict[str, nn.Module], stats: dict[str, Any]
    ) -> None:
        cfg = self.cfg
        self.smoothed = smooth_block_(block, layers, stats, cfg.alpha) if cfg.smooth else {}

    @torch.no_grad()
    def compress_layer(self, name: str, module: nn.Module, stats: InputAbsMax) -> dict[str, Any]:
        cfg = self.cfg
        attach_quantized_(module, symmetric_quantize(weight_matrix(module), cfg.weight_bits))
        act_max = float(stats.absmax.max())
        qmax = 2 ** (cfg.act_bits - 1) - 1
        attach_act_quant_(module, max(act_max, 1e-8) / qmax, cfg.act_bits)
        return {"smoothed": name in self.smoothed, "act_absmax": act_max}


register(SmoothQuant, SmoothQuantAlgorithm)

REGISTRY.register("smoothquant", SmoothQuant, returning_model(one_shot_), takes=ONE_SHOT_TAKES)
