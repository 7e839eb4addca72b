"""A diffusers ``DiTTransformer2DModel`` (Peebles & Xie, "Scalable Diffusion Models with Transformers")
as a dkdm denoiser: imported from a ``DiTPipeline`` folder, used as a teacher, never trained here.

DiT is class-conditional by construction: its adaLN-Zero takes the timestep and the class label,
and its label table has one more row than there are classes, the null class (label
``num_embeds_ada_norm``) that classifier-free guidance runs the unconditional half with.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from torch import nn


class DiffusersDiT(nn.Module):
    """(x_t, t, labels) -> (B, k·C, H, W): the transformer's output, its first ``out_channels`` kept.

    ``out_channels`` is 2C when the teacher's variance is learned (DiT's ε and v), and C when the
    scheduler fixes the variance and the network's variance half is dropped, as DiTPipeline does.
    """

    def __init__(self, net: DiTTransformer2DModel, out_channels: int) -> None:
        super().__init__()
        self.net = net
        self.out_channels = out_channels

    @property
    def num_classes(self) -> int:
        return int(self.net.config.num_embeds_ada_norm)  # type: ignore[attr-defined]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:  # DiT has no label-free path: "no label" is its null class
            labels = torch.full((x_t.shape[0],), self.num_classes, dtype=torch.long, device=x_t.device)
        out = self.net(x_t, timestep=t, class_labels=labels).sample  # type: ignore[operator]  # (B, out, H, W)
        return out[:, : self.out_channels]  # (B, k·C, H, W)
