"""The one gesture CNN used by training, the API and the live worker.

Sensor channels are the input channels of a temporal 1-D CNN: input (batch, n_channels, n_samples), output
(batch, n_classes) logits. Global pooling at the end makes the window length (and so the sample rate) free.
The constructor takes only JSON-able hyper-parameters so the network can be rebuilt from artifact metadata.

Structure contract (``ml_model.rest.stacking`` folds it for batched multi-user inference): ``features`` is an
``nn.Sequential`` of ungrouped ``Conv1d`` (each optionally followed by ``BatchNorm1d``) and per-channel
modules; ``forward`` pools ``features(x)`` into [mean, log mean-square] over time; ``head`` is ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MAX_CHANNELS = 16
LOG_EPS = 1e-4


class EMGNet(nn.Module):
    """Learned spatial + temporal filter bank with log-power pooling, for windows of standardised sEMG.

    A 1x1 convolution mixes the electrodes into ``width`` spatial filters (a learned montage); ``depth``
    temporal convolutions (GELU between them, none after the last) turn them into ``2 * width`` band-limited
    signals; their log mean-square over the window is the learned analogue of the RMS / spectral-power
    features that classic sEMG classifiers rely on. Power pooling suits sEMG far better than averaging
    ReLU maps: the information is in how much each muscle fires, not where in the window.
    """

    def __init__(
        self,
        n_channels: int,
        n_classes: int,
        width: int = 32,
        depth: int = 1,
        kernel_size: int = 9,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if not 1 <= n_channels <= MAX_CHANNELS:
            raise ValueError(f"n_channels must be 1..{MAX_CHANNELS}, got {n_channels}")
        if n_classes < 2:
            raise ValueError("n_classes must be >= 2")
        if width < 1 or depth < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError("width and depth must be >= 1 and kernel_size a positive odd number")
        self._hparams = {
            "n_channels": int(n_channels),
            "n_classes": int(n_classes),
            "width": int(width),
            "depth": int(depth),
            "kernel_size": int(kernel_size),
            "dropout": float(dropout),
        }
        layers: list[nn.Module] = [nn.Conv1d(n_channels, width, kernel_size=1, bias=False), nn.BatchNorm1d(width)]
        c_in = width
        for i in range(depth):
            last = i == depth - 1
            c_out = 2 * width if last else width
            # No padding: zero-padded edges would bias the power estimate, and it is a third faster to train.
            layers += [nn.Conv1d(c_in, c_out, kernel_size, bias=False), nn.BatchNorm1d(c_out)]
            if not last:
                layers.append(nn.GELU())
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * c_in, n_classes)

    @property
    def min_samples(self) -> int:
        """Shortest window the network accepts (the unpadded temporal convolutions shrink it)."""
        return min_window_samples(self._hparams)

    @property
    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able): ``EMGNet(**model.hparams)`` rebuilds the architecture."""
        return dict(self._hparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, n_channels, n_samples >= min_samples) float32 -> (batch, n_classes) logits."""
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=-1), torch.log(h.pow(2).mean(dim=-1) + LOG_EPS)], dim=1)
        return self.head(self.dropout(pooled))


def min_window_samples(hparams: dict[str, Any]) -> int:
    """Shortest window (samples) an ``EMGNet`` with these hyper-parameters accepts (defaults filled in)."""
    return 1 + int(hparams.get("depth", 1)) * (int(hparams.get("kernel_size", 9)) - 1)


def build_model(hparams: dict[str, Any]) -> EMGNet:
    """Rebuild an (untrained) ``EMGNet`` from its ``hparams`` dict."""
    return EMGNet(**hparams)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
