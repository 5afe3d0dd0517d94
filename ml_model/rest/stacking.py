"""Run many users' small CNNs as ONE forward pass.

Live inference sends one or two windows per user per round; a separate forward per user costs ~0.4 ms of
framework overhead each, which for 50 users is most of the latency budget. Models with the same architecture
are therefore evaluated together: batch-norm is folded into each convolution, a 1x1 mixing convolution into the
temporal one after it, and every (model, window) pair becomes one slice of a batched matrix product, so 100
windows of 50 users cost one pass through the layers.

`extract_parts` understands the layer types EMGNet uses; anything else returns None and the caller falls back
to the model's own forward. The serving code compares the stacked result with the model's own predictor when
it loads a model, so a change of architecture can never silently change predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

# Elementwise / pooling modules that act per channel and so work unchanged on grouped channels.
_PER_CHANNEL = (nn.GELU, nn.ReLU, nn.ELU, nn.SiLU, nn.LeakyReLU, nn.Tanh, nn.MaxPool1d, nn.AvgPool1d, nn.Identity,
                nn.Dropout)


@dataclass(frozen=True)
class NetParts:
    """One model's layers with batch-norm folded in: ('conv', weight, bias, padding) or ('mod', module)."""

    signature: tuple
    layers: tuple
    head_weight: torch.Tensor  # (n_classes, n_features)
    head_bias: torch.Tensor    # (n_classes,)


def _fold(conv: nn.Conv1d, bn: nn.BatchNorm1d | None) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(w.shape[0])
    if bn is not None:
        scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
        w = w * scale[:, None, None]
        b = (b - bn.running_mean.float()) * scale + bn.bias.detach().float()
    return w.contiguous(), b.contiguous()


def extract_parts(model: nn.Module) -> NetParts | None:
    """Folded layers of an EMGNet-like model (features Sequential + mean/log-energy pooling + linear head)."""
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if not isinstance(features, nn.Sequential) or not isinstance(head, nn.Linear):
        return None
    mods = list(features)
    layers, sig, i = [], [], 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Conv1d):
            if m.groups != 1 or m.stride != (1,) or m.dilation != (1,) or not isinstance(m.padding, tuple) \
                    or m.padding_mode != "zeros":
                return None
            bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm1d) else None
            if bn is not None and (not bn.track_running_stats or bn.running_mean is None):
                return None
            w, b = _fold(m, bn)
            layers.append(("conv", w, b, m.padding[0]))
            sig.append(("conv", tuple(w.shape), m.padding[0]))
            i += 2 if bn is not None else 1
        elif isinstance(m, _PER_CHANNEL):
            layers.append(("mod", m))
            sig.append(("mod", repr(m)))
            i += 1
        else:
            return None
    sig.append(("head", tuple(head.weight.shape)))
    return NetParts(tuple(sig), tuple(layers), head.weight.detach().float().contiguous(),
                    head.bias.detach().float().contiguous())


def _compose(first: tuple, second: tuple) -> tuple | None:
    """Two convolutions with nothing between them as one, when exact: a 1x1 mixing conv (no padding) feeding
    an unpadded conv is the conv with weight W2 @ W1 (EMGNet's learned montage + temporal filter bank: for
    8 electrodes this is ~4x fewer multiply-adds). None when it would change the result (padding)."""
    w1, b1, p1 = first[1], first[2], first[3]
    w2, b2, p2 = second[1], second[2], second[3]
    if w1.shape[-1] != 1 or p1 != 0 or p2 != 0:
        return None
    w = torch.einsum("odk,dc->ock", w2, w1[..., 0])
    b = b2 + torch.einsum("odk,d->o", w2, b1)
    return ("conv", w.contiguous(), b.contiguous(), 0)


def _fuse(layers: Sequence[tuple]) -> list[tuple]:
    out: list[tuple] = []
    for layer in layers:
        if layer[0] == "conv" and out and out[-1][0] == "conv" and (c := _compose(out[-1], layer)) is not None:
            out[-1] = c
        else:
            out.append(layer)
    return out


class Bank:
    """Several models with one signature, parameters stacked along a leading model axis.

    `logits(x, idx)` evaluates window s with model idx[s]: the per-window weights are gathered with one
    index_select per layer and every convolution runs as one batched matrix product over unfolded windows
    (im2col). Measured against a grouped convolution (groups = windows) for 8 ch x 50 samples windows of
    EMGNet: 5 / 20 / 60 windows 109 / 276 / 623 us vs 315 / 709 / 5620 us on one thread.
    """

    def __init__(self, parts: Sequence[NetParts]):
        if not parts or len({p.signature for p in parts}) != 1:
            raise ValueError("a bank needs one or more models with the same signature")
        fused = [_fuse(p.layers) for p in parts]
        self.layers: list[tuple] = []
        for k, layer in enumerate(fused[0]):
            if layer[0] == "conv":
                w = torch.stack([f[k][1] for f in fused])  # (K, Cout, Cin, kernel)
                b = torch.stack([f[k][2] for f in fused])  # (K, Cout)
                kernel = w.shape[-1]
                # (K, Cin*kernel, Cout): rows ordered like the unfolded input below (channel-major)
                w_mat = w.reshape(w.shape[0], w.shape[1], -1).transpose(1, 2).contiguous()
                self.layers.append(("conv", w_mat, b.unsqueeze(1).contiguous(), layer[3], kernel))
            else:
                self.layers.append(layer)
        self.head_weight = torch.stack([p.head_weight for p in parts])  # (K, n_classes, F)
        self.head_bias = torch.stack([p.head_bias for p in parts])  # (K, n_classes)

    def logits(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x: (S, C, T) float32 prepared windows, idx: (S,) int64 model of each -> (S, n_classes) logits."""
        s = x.shape[0]
        h = x  # (S, C, T)
        for layer in self.layers:
            if layer[0] == "conv":
                _, w_mat, b, pad, kernel = layer
                if pad:
                    h = F.pad(h, (pad, pad))
                if kernel == 1:
                    u = h.transpose(1, 2)  # (S, T, C)
                else:
                    # (S, C, T', k) -> (S, T', C*k): every output step's receptive field as one row
                    u = h.unfold(2, kernel, 1).permute(0, 2, 1, 3).reshape(s, h.shape[2] - kernel + 1, -1)
                h = torch.baddbmm(b.index_select(0, idx), u, w_mat.index_select(0, idx)).transpose(1, 2)
            else:
                h = layer[1](h)
        # Same pooling as EMGNet.forward: mean and log-energy over time.
        feats = torch.cat([h.mean(dim=-1), torch.log(h.pow(2).mean(dim=-1) + 1e-4)], dim=1)
        hw = self.head_weight.index_select(0, idx)
        hb = self.head_bias.index_select(0, idx)
        return torch.bmm(hw, feats.unsqueeze(2)).squeeze(2) + hb


def stacked_logits(parts: Sequence[NetParts], x: torch.Tensor) -> torch.Tensor:
    """x: (S, C, T) float32, window s evaluated by parts[s] (all with one signature) -> (S, n_classes) logits."""
    return Bank(parts).logits(x, torch.arange(len(parts)))
