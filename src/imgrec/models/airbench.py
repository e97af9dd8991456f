"""`airnet`: airbench's CIFAR-10 network (Jordan, 2024, "94% on CIFAR-10 in 3.29 seconds"),
sized for a CPU.

What makes it learn fast, kept from airbench: a first 2x2 convolution whose weights whiten the
image patches (set once from the training data's patch covariance and frozen; its bias
trains), conv -> max-pool -> BatchNorm -> GELU groups (pooling before the norm runs it on a
quarter of the pixels), identity (Dirac) initialisation of the convolutions, BatchNorm with a
fixed scale and a fast running average, global max pooling and a down-scaled linear head. The
widths are arguments: airbench's own (64, 256, 256) costs ~0.7 GFLOP per training image, too
much for a laptop's CPU, so the CIFAR-10 recipe picks narrower ones (training/recipes.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

#: airbench's logit scale (1/9): a down-scaled head trains better with label smoothing
HEAD_SCALE = 1 / 9
#: eigenvalue floor of the whitening: keeps the near-constant patch directions from exploding
WHITEN_EPS = 5e-4


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    """3x3 'same' convolution without bias, initialised close to the identity (Dirac on the
    first c_in filters): a deep net of them starts as a shallow one."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


def _norm(c: int) -> nn.BatchNorm2d:
    """BatchNorm with a frozen scale of 1 (only the shift trains) and airbench's momentum.
    eps stays PyTorch's 1e-5 (airbench: 1e-12): a channel that is constant on the data (a
    flat colour plane) would otherwise blow its gradient up by 1e6 and the run to NaN."""
    bn = nn.BatchNorm2d(c, eps=1e-5, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.pool, self.norm1 = _conv(c_in, c_out), nn.MaxPool2d(2), _norm(c_out)
        self.conv2, self.norm2, self.act = _conv(c_out, c_out), _norm(c_out), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    """timm's interface (forward_features / forward_head / get_classifier), as the other
    scratch nets, so explain, export and transfer treat it alike."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...]):
        super().__init__()
        k = 2  # whitening patch side
        self.whiten = nn.Conv2d(in_channels, 2 * in_channels * k * k, k, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by init_from_data, then fixed
        self.act = nn.GELU()
        chans = [self.whiten.out_channels, *widths]
        pairs = zip(chans, chans[1:], strict=False)
        self.groups = nn.Sequential(*(ConvGroup(a, b) for a, b in pairs))
        self.pool = nn.AdaptiveMaxPool2d(1)  # exports as GlobalMaxPool
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.num_features = self.head_hidden_size = widths[-1]
        self.num_classes = num_classes

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Whitening weights from a batch of normalised training images (N x C x H x W): the
        eigenvectors of the k x k patch covariance scaled by 1/sqrt(eigenvalue), and their
        negatives (GELU then passes both signs). The weights are an ordinary frozen parameter,
        so a saved state dict rebuilds the network without the data."""
        w = self.whiten.weight
        c, k = w.shape[1], w.shape[2]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1)  # N C H' W' k k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov)
        filters = (eigvec.T / torch.sqrt(eigval.clamp_min(0) + WHITEN_EPS)[:, None])
        filters = filters.flip(0).reshape(-1, c, k, k).to(w.dtype)
        w.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.groups(self.act(self.whiten(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.head(x) * HEAD_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.head = (nn.Linear(self.head_hidden_size, num_classes, bias=False)
                     if num_classes > 0 else nn.Identity())
        self.num_classes = num_classes

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """airbench's two learning rates: the BatchNorm shifts (and the whitening bias) move
        64x faster than the weights, with the same absolute decay per step."""
        fast = [p for n, p in self.named_parameters()
                if p.requires_grad and (".norm" in n or n == "whiten.bias")]
        ids = {id(p) for p in fast}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
                {"params": fast, "lr": lr * BIAS_LR, "weight_decay": weight_decay / BIAS_LR}]


#: the BatchNorm shifts' learning-rate multiplier (airbench's bias_scaler)
BIAS_LR = 64.0


@register_model("airnet", summary="airbench-style net: whitened first layer, conv-pool-BN-GELU "
                "groups (CIFAR-10 default)", default_size=32, aliases=("airbench",))
def airnet(in_channels: int, num_classes: int, image_size: int,
           widths: tuple[int, ...] | list[int] = (64, 256, 256)) -> nn.Module:
    """airbench's network; `widths` are the three groups' channels (airbench94: 64, 256,
    256). Any input of 16 px or more works (global pooling)."""
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1:
        from ..errors import ModelError

        raise ModelError(f"airnet widths must be positive channel counts, not {widths}")
    del image_size  # global pooling: the network takes any size
    return AirNet(in_channels, num_classes, widths)
