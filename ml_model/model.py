"""The one gesture CNN used by training, the API and the live worker.

Sensor channels are the input channels of a temporal 1-D CNN: input (batch, n_channels, n_samples), output
(batch, n_classes) logits. Global pooling at the end makes the window length (and so the sample rate) free.
The constructor takes only JSON-able hyper-parameters so the network can be rebuilt from artifact metadata.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MAX_CHANNELS = 16


class EMGNet(nn.Module):
    """Small temporal CNN for windows of standardised sEMG.

    A 1x1 convolution first mixes the electrodes (a learned spatial filter, like a bipolar montage), then
    ``depth`` temporal conv blocks (conv -> batch-norm -> GELU, every other block halving the time axis)
    widen to ``width * 2`` channels. Global average pooling of the activations and of their log-energy
    (the classic RMS feature of sEMG, which a plain average of ReLUs captures poorly) feed a linear head.
    """

    def __init__(
        self,
        n_channels: int,
        n_classes: int,
        width: int = 32,
        depth: int = 3,
        kernel_size: int = 5,
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
        layers: list[nn.Module] = [
            nn.Conv1d(n_channels, width, kernel_size=1, bias=False),
            nn.BatchNorm1d(width),
        ]
        c_in = width
        for i in range(depth):
            c_out = width if i < depth - 1 else 2 * width
            layers += [
                nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(c_out),
                nn.GELU(),
            ]
            # Pool after odd blocks: halves compute while keeping receptive field growing; never pool last.
            if i % 2 == 1 and i < depth - 1:
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * c_in, n_classes)

    @property
    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able): ``EMGNet(**model.hparams)`` rebuilds the architecture."""
        return dict(self._hparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, n_channels, n_samples) float32 -> (batch, n_classes) logits."""
        h = self.features(x)
        mean = h.mean(dim=-1)
        log_energy = torch.log(h.pow(2).mean(dim=-1) + 1e-4)
        return self.head(self.dropout(torch.cat([mean, log_energy], dim=1)))


def build_model(hparams: dict[str, Any]) -> EMGNet:
    """Rebuild an (untrained) ``EMGNet`` from its ``hparams`` dict."""
    return EMGNet(**hparams)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
