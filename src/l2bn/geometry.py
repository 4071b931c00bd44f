"""The paper's identity-layer experiments (Wang et al., Fig. 2, 4 and 5): what BN and L2BN do to directions.

An *identity layer* is the normalization alone (γ = 1, β = 0, no convolution, no activation), applied in
training mode to a batch whose samples are the rows of a k × d tensor, so the batch statistics come from
those k rows. Stacking such layers shows the geometry that the normalization itself induces:

* inter-class (Fig. 2/4): pass class centers through. BN standardises each dimension once; a second BN
  finds zero mean and unit variance and changes nothing, so the minimum angle between centers moves once
  and stays. L2BN first equalises the norms, so every layer moves the centers again and the minimum angle
  keeps growing toward the equiangular optimum (120° for three classes in 2-D).
* intra-class (Fig. 5): vectors of one direction but different norms. BN's mean subtraction sends them in
  different directions; L2BN maps them to one vector first, so they stay together (angle 0).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import l2_batch_norm
from .metrics import pairwise_angles

__all__ = [
    "DEFAULT_CENTERS",
    "DEFAULT_INTRA_CLASS",
    "DEFAULT_OTHERS",
    "NORMS",
    "equiangular_limit",
    "identity_layer",
    "intra_class_spread",
    "min_center_angles",
    "propagate",
    "write_figures",
]

NORMS = ("bn", "l2bn")

# Three 2-D class centers in the positive quadrant (as after a ReLU), of unequal norms and nearly aligned.
DEFAULT_CENTERS = torch.tensor([[1.0, 0.2], [0.8, 1.0], [3.0, 2.5]], dtype=torch.float64)
# Fig. 5: one class, one direction, four norms; and two samples of another class in the same batch.
DEFAULT_INTRA_CLASS = torch.tensor([[1.0, 0.5]], dtype=torch.float64) * torch.tensor(
    [[0.5], [1.0], [2.0], [4.0]], dtype=torch.float64
)
DEFAULT_OTHERS = torch.tensor([[0.3, 1.5], [0.6, 2.5]], dtype=torch.float64)


def identity_layer(x: Tensor, norm: str, *, eps: float = 1e-5) -> Tensor:
    """One identity layer: BN or L2BN (γ = 1, β = 0) with the statistics of the batch ``x`` (k × d, k ≥ 2)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"expected a (k, d) batch with k >= 2 rows, got shape {tuple(x.shape)}")
    if norm == "bn":
        return F.batch_norm(x, None, None, training=True, eps=eps)
    return l2_batch_norm(x, None, None, training=True, eps=eps)


def propagate(x: Tensor, num_layers: int, norm: str, *, eps: float = 1e-5) -> list[Tensor]:
    """``x`` (as float64) before the first identity layer and after each of ``num_layers`` layers."""
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    states = [x.detach().to(torch.float64)]
    for _ in range(num_layers):
        states.append(identity_layer(states[-1], norm, eps=eps))
    return states


def _min_angle(x: Tensor) -> float:
    angles = pairwise_angles(x)
    angles.fill_diagonal_(math.inf)
    return float(angles.min())


def min_center_angles(centers: Tensor, num_layers: int, norm: str) -> list[float]:
    """Minimum pairwise angle (degrees) of class ``centers`` (k × d) at input (index 0) and after each layer."""
    if centers.dim() != 2 or centers.shape[0] < 2:
        raise ValueError(f"centers must be a (k, d) tensor with k >= 2, got shape {tuple(centers.shape)}")
    angles = []
    for layer, state in enumerate(propagate(centers, num_layers, norm)):
        zero = (state == 0).all(dim=1).nonzero().flatten().tolist()
        if zero:
            where = "at the input" if layer == 0 else f"after {norm} layer {layer}"
            raise ValueError(f"centers {zero} are zero vectors {where}, so their angles are undefined")
        angles.append(_min_angle(state))
    return angles


def intra_class_spread(class_features: Tensor, others: Tensor | None, num_layers: int, norm: str) -> list[float]:
    """Largest pairwise angle (degrees) among ``class_features`` at input and after each identity layer.

    The layers see the batch ``cat(class_features, others)``; ``others`` (samples of other classes, may be
    None) shape the batch statistics as in a real mini-batch. Fig. 5: same-direction vectors of different
    norms spread under BN and stay at 0° under L2BN.
    """
    k = class_features.shape[0]
    if class_features.dim() != 2 or k < 2:
        raise ValueError(f"class_features must be a (m, d) tensor with m >= 2, got shape {tuple(class_features.shape)}")
    batch = class_features if others is None else torch.cat([class_features, others.to(class_features.dtype)])
    return [float(pairwise_angles(s[:k]).max()) for s in propagate(batch, num_layers, norm)]


# ------------------------------------------------------------------------------------------------ figures
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _shown_layers(num_layers: int, max_columns: int = 6) -> list[int]:
    """Layers to draw: all if few, else the input, layer 1 and evenly spaced ones up to the last."""
    if num_layers + 1 <= max_columns:
        return list(range(num_layers + 1))
    steps = max_columns - 2
    return sorted({0, 1, *(round(i * num_layers / steps) for i in range(steps + 1))})


def _arrow_grid(rows: dict[str, list[Tensor]], colors: Sequence[str], path: Path, title: str, label) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = len(next(iter(rows.values()))) - 1
    shown = _shown_layers(num_layers)
    fig, axes = plt.subplots(len(rows), len(shown), figsize=(2.3 * len(shown), 2.8 * len(rows)), squeeze=False)
    for r, (name, states) in enumerate(rows.items()):
        for c, layer in enumerate(shown):
            ax, x = axes[r][c], states[layer]
            lim = 1.15 * float(x.norm(dim=1).max())
            for i, v in enumerate(x.tolist()):
                ax.annotate("", xy=(v[0], v[1]), xytext=(0, 0),
                            arrowprops=dict(arrowstyle="-|>", color=colors[i], lw=1.6, shrinkA=0, shrinkB=0))
            ax.axhline(0, color="0.85", lw=0.6, zorder=0)
            ax.axvline(0, color="0.85", lw=0.6, zorder=0)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{'input' if layer == 0 else f'layer {layer}'}\n{label(x)}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name.upper(), fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curves(curves: dict[str, list[float]], path: Path, ylabel: str, title: str, target: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", ms=3.5, label=name.upper())
    if target is not None:
        ax.axhline(target, color="0.5", ls="--", lw=0.8, label=f"optimum {target:.0f}°")
    ax.set_xlabel("identity layers applied")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def equiangular_limit(k: int, d: int) -> float | None:
    """Largest possible minimum angle (degrees) of k directions in d dims when known (simplex, k ≤ d + 1)."""
    if 2 <= k <= d + 1:
        return math.degrees(math.acos(-1.0 / (k - 1)))
    return None


def write_figures(
    out_dir: str | Path,
    centers: Tensor = DEFAULT_CENTERS,
    num_layers: int = 12,
    *,
    class_features: Tensor = DEFAULT_INTRA_CLASS,
    others: Tensor | None = DEFAULT_OTHERS,
) -> list[Path]:
    """Write the geometry PNGs to ``out_dir`` and return their paths (arrow plots need 2-D inputs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    k, d = centers.shape
    limit = equiangular_limit(k, d)
    inter = {n: min_center_angles(centers, num_layers, n) for n in NORMS}
    path = out / "inter_class_min_angle.png"
    _curves(inter, path, "min angle between class centers (°)",
            f"Inter-class: {k} centers in {d}-D through identity layers", limit)
    written.append(path)
    if d == 2:
        path = out / "inter_class_arrows.png"
        _arrow_grid({n: propagate(centers, num_layers, n) for n in NORMS}, _COLORS, path,
                    "Class centers through identity layers (one color per class)",
                    lambda x: f"min ∠ {_min_angle(x):.1f}°")
        written.append(path)
    m = class_features.shape[0]
    intra = {n: intra_class_spread(class_features, others, num_layers, n) for n in NORMS}
    path = out / "intra_class_spread.png"
    _curves(intra, path, "max angle within the class (°)",
            f"Intra-class: {m} same-direction vectors of different norms", None)
    written.append(path)
    if class_features.shape[1] == 2:
        batch = class_features if others is None else torch.cat([class_features, others.to(class_features.dtype)])
        n_other = batch.shape[0] - m
        colors = ["tab:blue"] * m + ["tab:orange"] * n_other
        path = out / "intra_class_arrows.png"
        _arrow_grid({n: propagate(batch, min(num_layers, 3), n) for n in NORMS}, colors, path,
                    "One class (blue, one direction, different norms) in a batch with another class (orange)",
                    lambda x: f"max ∠ in class {float(pairwise_angles(x[:m]).max()):.1f}°")
        written.append(path)
    return written
