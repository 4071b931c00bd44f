"""Discriminability metrics of the L2BN paper: intra-class angle, inter-class angle and their ratio (IIR).

Following the paper (Wang et al., supplementary A, eq. 1-3 and eq. 4 of the main text), with features
taken at the input of the classification layer and ``u_n = x_n / ‖x_n‖₂``:

* class center      ``c_i = mean{u_n : y_n = i}``                               (eq. 1)
* intra-class angle ``mean_n ∠(u_n, c_{y_n})`` — a mean over all samples            (eq. 2)
* inter-class angle ``mean_i min_{j≠i} ∠(c_i, c_j)`` over classes that have a center  (eq. 3)
* IIR               ``intra / inter`` — smaller means more discriminative features   (eq. 4)
* cone angle        ``mean_n ∠(u_n, g)``, ``g`` the mean of the class centers — how wide the cone of all
  features is; not in the paper: it tells a contracting cone (intra and inter both smaller) from classes
  that separate (smaller intra, larger inter)

Angles are in degrees. All sums run in float64. Conventions for the edge cases (see ``docs/metrics.md``):
zero feature vectors have no direction and are skipped (and counted); a class with no sample has no
center (a zero row) and takes no part in the inter-class angle; non-finite features, fewer than two
classes with a center, or a sample whose class has no center raise ``ValueError``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

__all__ = [
    "AngleAccumulator",
    "AngleStats",
    "FeatureHook",
    "IntraAngleAccumulator",
    "angle_stats",
    "extract_features",
    "inter_angle",
    "intra_angle",
    "pairwise_angles",
]

_ACC = torch.float64


@dataclass(frozen=True, eq=False)
class AngleStats:
    """Result of :func:`angle_stats`: ``intra``, ``inter``, ``iir`` (degrees, ratio) and the class ``centers``.

    ``centers`` (k × d, float64) are the means of the l2-normalised features (zero rows for classes without
    samples); pass them as ``centers=`` to measure another set (e.g. the test set) against them.
    ``counts`` holds the number of samples used per class, ``num_skipped`` the zero vectors left out, ``cone``
    the mean angle (degrees) of the features to the mean of the class centers.
    """

    intra: float
    inter: float
    iir: float
    centers: Tensor = field(repr=False)
    counts: Tensor = field(repr=False)
    num_skipped: int = 0
    cone: float = math.nan


# --------------------------------------------------------------------------------------------- helpers
def _as_matrix(features: Tensor) -> Tensor:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a Tensor, got {type(features).__name__}")
    if features.dim() < 2:
        raise ValueError(f"features must have shape (N, d, ...), got shape {tuple(features.shape)}")
    return features.flatten(1)


def _check_labels(labels: Tensor, n: int, num_classes: int | None) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the features, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    labels = labels.long()
    if n and num_classes is not None:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return labels


def _check_finite(features: Tensor, what: str = "features") -> None:
    bad = ~torch.isfinite(features).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        unit = "sample(s)" if what == "features" else "row(s)"
        raise ValueError(
            f"{what} contain NaN or inf in {rows.numel()} {unit} (first at index {int(rows[0])}); "
            f"angles of non-finite {what} are undefined"
        )


def _unit_rows(features: Tensor) -> tuple[Tensor, Tensor]:
    """float64 unit vectors of the rows and a mask of rows with a direction (non-zero norm)."""
    x = features.to(_ACC)
    norms = torch.linalg.vector_norm(x, dim=1)
    valid = norms > 0
    return x / norms.clamp_min(torch.finfo(_ACC).tiny).unsqueeze(1), valid


def _angle_deg(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise angle in degrees between unit vectors, as 2·atan2(‖a−b‖, ‖a+b‖) (accurate near 0° and 180°)."""
    diff = torch.linalg.vector_norm(a - b, dim=-1)
    summ = torch.linalg.vector_norm(a + b, dim=-1)
    return torch.rad2deg(2.0 * torch.atan2(diff, summ))


def _center_directions(centers: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(centers, Tensor) or centers.dim() != 2:
        shape = tuple(centers.shape) if isinstance(centers, Tensor) else type(centers).__name__
        raise ValueError(f"centers must be a (num_classes, d) tensor, got {shape}")
    _check_finite(centers, "centers")
    return _unit_rows(centers)


def pairwise_angles(vectors: Tensor) -> Tensor:
    """k × k matrix of angles in degrees between the rows of ``vectors`` (float64; rows must be non-zero)."""
    units, valid = _unit_rows(_as_matrix(vectors))
    if not bool(valid.all()):
        raise ValueError(f"pairwise_angles needs non-zero rows; rows {valid.logical_not().nonzero().flatten().tolist()} are zero")
    cos = (units @ units.T).clamp(-1.0, 1.0)
    angles = torch.rad2deg(torch.acos(cos))
    angles.fill_diagonal_(0.0)
    return angles


def inter_angle(centers: Tensor) -> float:
    """Mean over classes of the minimum angle (degrees) to another class center (supplementary eq. 3).

    Zero rows (classes without samples) are left out. Raises ``ValueError`` if fewer than two remain.
    """
    _, valid = _center_directions(centers)
    present = valid.nonzero().flatten()
    if present.numel() < 2:
        raise ValueError(
            f"the inter-class angle needs at least 2 classes with a center, got {present.numel()} "
            f"(classes {present.tolist()}); use intra_angle() for a single class"
        )
    angles = pairwise_angles(centers[present])
    angles.fill_diagonal_(math.inf)
    return float(angles.min(dim=1).values.mean())


def _intra_sum(units: Tensor, labels: Tensor, center_units: Tensor, center_valid: Tensor) -> Tensor:
    """Sum (float64 tensor) of the angles between unit rows and their class center directions."""
    if labels.numel() == 0:
        return units.new_zeros(())
    missing = ~center_valid[labels]
    if bool(missing.any()):
        absent = torch.unique(labels[missing]).tolist()
        raise ValueError(
            f"classes {absent} have samples but no center (a zero row: the class was absent from the set the "
            "centers came from, or its unit vectors cancel out)"
        )
    return _angle_deg(units, center_units[labels]).sum()


def _prepare(features: Tensor, labels: Tensor, num_classes: int | None) -> tuple[Tensor, Tensor, int]:
    """Validate, drop zero vectors; returns unit rows, their labels and the number of skipped rows."""
    x = _as_matrix(features)
    labels = _check_labels(labels, x.shape[0], num_classes).to(x.device)
    _check_finite(x)
    units, valid = _unit_rows(x)
    skipped = int((~valid).sum())
    if skipped:
        units, labels = units[valid], labels[valid]
    return units, labels, skipped


def intra_angle(features: Tensor, labels: Tensor, centers: Tensor) -> float:
    """Mean angle (degrees) between each feature and its class center (supplementary eq. 2).

    Zero feature vectors are skipped; raises ``ValueError`` if no sample is left.
    """
    center_units, center_valid = _center_directions(centers)
    units, labels, _ = _prepare(features, labels, centers.shape[0])
    if labels.numel() == 0:
        raise ValueError("intra_angle needs at least one non-zero feature vector")
    if units.shape[1] != center_units.shape[1]:
        raise ValueError(f"features have dimension {units.shape[1]} but centers have {center_units.shape[1]}")
    center_units, center_valid = center_units.to(units.device), center_valid.to(units.device)
    return float(_intra_sum(units, labels, center_units, center_valid)) / labels.numel()


def angle_stats(
    features: Tensor,
    labels: Tensor,
    centers: Tensor | None = None,
    *,
    num_classes: int | None = None,
) -> AngleStats:
    """Intra-class angle, inter-class angle and IIR of ``features`` (N, d) with integer ``labels`` (N,).

    Without ``centers`` the class centers are computed from these features (eq. 1). With ``centers``
    (e.g. ``angle_stats(train_x, train_y).centers``) the intra-class angle measures these features against
    them, as the paper does for the test set, and the inter-class angle is that of the given centers.
    ``num_classes`` defaults to ``len(centers)``, else ``labels.max() + 1``.
    """
    if centers is not None:
        _center_directions(centers)
        if num_classes is not None and num_classes != centers.shape[0]:
            raise ValueError(f"num_classes={num_classes} disagrees with centers of shape {tuple(centers.shape)}")
        num_classes = centers.shape[0]
    x = _as_matrix(features)
    if x.shape[0] == 0:
        raise ValueError("angle_stats needs at least one sample, got 0")
    if num_classes is None:
        num_classes = int(_check_labels(labels, x.shape[0], None).max()) + 1
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if centers is None:
        acc = AngleAccumulator(num_classes, device=x.device)
        acc.update(x, labels)
        centers = acc.centers()
    intra = IntraAngleAccumulator(centers, device=x.device)
    intra.update(x, labels)
    return intra.compute()


# ------------------------------------------------------------------------------------------ streaming
def _all_reduce_(tensors: Iterable[Tensor], group: dist.ProcessGroup | None) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


class AngleAccumulator:
    """Streaming first pass: per-class sums of unit feature vectors and counts, O(classes × d) float64 state.

    Feed batches with :meth:`update`; :meth:`all_reduce` sums the state over torch.distributed ranks;
    :meth:`centers` gives the class centers; :meth:`intra_pass` starts the second pass
    (:class:`IntraAngleAccumulator`) that the intra-class angle needs, since it depends on the final centers.
    ``dim`` may be given up front so that ranks that saw no data can still take part in :meth:`all_reduce`.
    """

    def __init__(self, num_classes: int, *, dim: int | None = None, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.device = torch.device(device) if device is not None else None
        self.sums: Tensor | None = None
        self.counts: Tensor | None = None
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)
        if dim is not None:
            self._init_state(dim, self.device)

    def _init_state(self, dim: int, device: torch.device | None) -> None:
        self.device = device = torch.device("cpu") if device is None else device
        self.sums = torch.zeros(self.num_classes, dim, dtype=_ACC, device=device)
        self.counts = torch.zeros(self.num_classes, dtype=torch.long, device=device)
        self.skipped = self.skipped.to(device)

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch of features (N, d, ...) with integer labels (N,)."""
        if self.sums is None:
            self._init_state(_as_matrix(features).shape[1], self.device or features.device)
        units, labels, skipped = _prepare(features.to(self.device), labels, self.num_classes)
        if units.shape[1] != self.sums.shape[1]:
            raise ValueError(f"features have dimension {units.shape[1]}, earlier batches had {self.sums.shape[1]}")
        self.sums.index_add_(0, labels, units)
        self.counts += torch.bincount(labels, minlength=self.num_classes)
        self.skipped += skipped

    @property
    def num_skipped(self) -> int:
        """Zero feature vectors seen (they have no direction and are left out)."""
        return int(self.skipped)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the state over the ranks of ``group`` (no-op unless torch.distributed is initialised)."""
        if self.sums is None:
            if dist.is_available() and dist.is_initialized():
                raise RuntimeError("this rank saw no data; construct AngleAccumulator with dim= to all-reduce")
            return
        _all_reduce_((self.sums, self.counts, self.skipped), group)

    def centers(self) -> Tensor:
        """Class centers (k × d, float64): the mean unit vector of each class, a zero row for absent classes."""
        if self.sums is None:
            raise ValueError("no features seen yet; call update() first")
        return self.sums / self.counts.clamp_min(1).unsqueeze(1).to(_ACC)

    def inter(self) -> float:
        """Inter-class angle (degrees) of the current centers."""
        return inter_angle(self.centers())

    def intra_pass(self) -> IntraAngleAccumulator:
        """A second-pass accumulator measuring intra-class angles against the current centers."""
        return IntraAngleAccumulator(self.centers(), device=self.device)


class IntraAngleAccumulator:
    """Streaming second pass: sum and count of the angles between features and given class ``centers``, and of
    their angles to the mean of those centers (the cone angle).

    :meth:`compute` returns :class:`AngleStats` with the inter-class angle of ``centers``.
    """

    def __init__(self, centers: Tensor, *, device: torch.device | str | None = None) -> None:
        device = torch.device(device) if device is not None else centers.device
        self.center_units, self.center_valid = _center_directions(centers.to(device))
        self._centers = centers.to(device=device, dtype=_ACC)
        self.device = device
        self.cone_unit, cone_valid = _unit_rows(self._centers[self.center_valid].sum(0, keepdim=True))
        self._cone_defined = bool(cone_valid.all())  # the centers' mean has a direction
        self.angle_sum = torch.zeros((), dtype=_ACC, device=device)
        self.cone_sum = torch.zeros((), dtype=_ACC, device=device)
        self.counts = torch.zeros(centers.shape[0], dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch of features (N, d, ...) with integer labels (N,)."""
        units, labels, skipped = _prepare(features.to(self.device), labels, self.center_units.shape[0])
        if units.shape[1] != self.center_units.shape[1]:
            raise ValueError(f"features have dimension {units.shape[1]} but centers have {self.center_units.shape[1]}")
        self.angle_sum += _intra_sum(units, labels, self.center_units, self.center_valid)
        self.cone_sum += _angle_deg(units, self.cone_unit.expand_as(units)).sum()
        self.counts += torch.bincount(labels, minlength=self.counts.numel())
        self.skipped += skipped

    @property
    def num_skipped(self) -> int:
        """Zero feature vectors seen (they have no direction and are left out)."""
        return int(self.skipped)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the state over the ranks of ``group`` (no-op unless torch.distributed is initialised)."""
        _all_reduce_((self.angle_sum, self.cone_sum, self.counts, self.skipped), group)

    def intra(self) -> float:
        """Mean intra-class angle (degrees) of the samples seen."""
        n = int(self.counts.sum())
        if n == 0:
            raise ValueError("no non-zero feature vectors seen; the intra-class angle is undefined")
        return float(self.angle_sum) / n

    def compute(self) -> AngleStats:
        """``AngleStats`` of the samples seen, with the inter-class angle of the centers."""
        intra, inter = self.intra(), inter_angle(self._centers)
        iir = intra / inter if inter > 0 else math.inf
        cone = float(self.cone_sum) / int(self.counts.sum()) if self._cone_defined else math.nan
        return AngleStats(intra, inter, iir, self._centers, self.counts.clone(), self.num_skipped, cone)


# ---------------------------------------------------------------------------------- feature extraction
def _find_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    if layer is None:
        layer = getattr(model, "feature_layer", None)  # models without a linear head name their feature layer
    if layer is None:
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear; pass layer= the qualified name of its classification layer"
            )
        return linears[-1]
    modules = dict(model.named_modules())
    if layer not in modules:
        names = [n for n in modules if n][-8:]
        raise ValueError(f"no module named {layer!r} in {type(model).__name__}; its last modules are {names}")
    return layer, modules[layer]


class FeatureHook:
    """Context manager capturing the input of one layer of ``model`` (default: the module named by the model's
    ``feature_layer`` attribute if it has one, e.g. the pooled class maps of the acoustic-scene FCNs, else the
    last ``nn.Linear``).

    After each forward pass inside the ``with`` block, :attr:`features` holds that layer's input
    (detached, flattened to (N, d)); the hook is removed on exit. ``layer`` is a qualified module name.
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        self.layer_name, self.module = _find_layer(model, layer)
        self.features: Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"layer {self.layer_name!r} was called without a tensor as its first input")
        self.features = args[0].detach().flatten(1)

    def __enter__(self) -> FeatureHook:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Unregister the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def extract_features(
    model: nn.Module,
    loader: Iterable,
    *,
    layer: str | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Features at the input of the classification layer for every ``(inputs, labels)`` batch of ``loader``.

    Runs ``model`` in eval mode under ``torch.no_grad`` on ``device`` (default: the model's), restores each
    module's train/eval mode afterwards, and returns CPU tensors ``(features (N, d), labels (N,))``.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be positive or None, got {max_batches}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    model.eval()
    try:
        with FeatureHook(model, layer) as hook, torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError("loader must yield (inputs, labels) pairs")
                inputs, target = batch[0], batch[1]
                hook.features = None
                model(inputs.to(device))
                if hook.features is None:
                    raise RuntimeError(f"layer {hook.layer_name!r} was not called in the forward pass")
                feats.append(hook.features.cpu())
                labels.append(torch.as_tensor(target).reshape(-1).cpu())
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not feats:
        raise ValueError("loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)
