"""What the paper reports, as data, for the study pages to print beside our measurements (labelled as the paper's).

Source: Wang et al., "L2BN: Enhancing Batch Normalization by Equalizing the L2 Norms of Features",
arXiv:2207.02625 — the numbers of its Tables 1–6 (CIFAR-100 unless said otherwise), each row cited by table and
row label as printed there. Accuracy is the paper's "mean ± std" (``acc``, ``acc_std``; the paper does not
state its seed count); angles are in degrees; a metric the table does not report is absent from the row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PAPER_CLAIM", "PAPER_PROTOCOL", "PAPER_SOURCE", "PaperRow", "paper_rows"]

PAPER_SOURCE = "Wang et al., arXiv:2207.02625"

# The paper's claims for L2BN against BN (section 4.1): higher test accuracy, smaller intra-angles, a larger
# inter-angle and so a smaller IIR. +1: L2BN's value is larger, -1: smaller.
PAPER_CLAIM: dict[str, int] = {
    "acc": +1, "intra_train": -1, "intra_test": -1, "inter": +1, "iir_train": -1, "iir_test": -1,
}


@dataclass(frozen=True)
class PaperRow:
    """One row of one of the paper's tables: where it is (``table``, ``label`` as printed), the norm of this
    project it corresponds to (``norm``: a norm name, or a placement for Table 4) and its numbers."""

    table: str
    label: str
    norm: str
    values: dict[str, float] = field(default_factory=dict)

    @property
    def citation(self) -> str:
        return f"{self.table}, row “{self.label}”"


def _t1(model: str, bn: tuple[float, ...], l2bn: tuple[float, ...]) -> list[PaperRow]:
    keys = ("acc", "acc_std", "intra_train", "intra_test", "inter", "iir_train", "iir_test")
    return [PaperRow("Table 1", f"{model} {name}", norm, dict(zip(keys, values)))
            for name, norm, values in (("BN", "bn", bn), ("L2BN", "l2bn", l2bn))]


# Table 1 (CIFAR-100): accuracy mean ± std, Intra(train), Intra(test), Inter, IIR train, IIR test.
TABLE1: dict[str, list[PaperRow]] = {
    "resnet20": _t1("ResNet-20", (69.70, 0.30, 28.15, 29.04, 21.70, 1.297, 1.338),
                    (70.17, 0.20, 27.61, 28.69, 22.31, 1.238, 1.286)),
    "resnet32": _t1("ResNet-32", (71.40, 0.20, 27.43, 28.75, 23.65, 1.160, 1.216),
                    (71.75, 0.21, 26.90, 28.39, 24.41, 1.102, 1.163)),
    "resnet44": _t1("ResNet-44", (72.53, 0.25, 27.06, 28.56, 24.80, 1.091, 1.152),
                    (73.10, 0.14, 26.28, 28.05, 25.85, 1.016, 1.085)),
    "resnet56": _t1("ResNet-56", (72.88, 0.25, 24.76, 28.91, 34.09, 0.726, 0.848),
                    (73.92, 0.20, 22.90, 27.73, 35.92, 0.638, 0.772)),
    "resnet110": _t1("ResNet-110", (74.82, 0.20, 23.45, 28.78, 38.98, 0.602, 0.739),
                     (75.32, 0.44, 20.57, 27.00, 41.87, 0.491, 0.645)),
    "densenet40_12": _t1("DenseNet-40-12", (75.17, 0.27, 27.45, 29.21, 23.54, 1.166, 1.241),
                         (75.36, 0.18, 27.62, 29.57, 24.99, 1.105, 1.183)),
    "densenet_bc100_12": _t1("DenseNet-BC-100-12", (77.44, 0.20, 31.07, 33.07, 28.11, 1.105, 1.176),
                             (77.87, 0.10, 30.59, 33.07, 31.28, 0.978, 1.057)),
    "vgg16": _t1("VGG-16", (74.54, 0.28, 14.58, 28.64, 61.99, 0.235, 0.462),
                 (74.70, 0.17, 13.42, 27.94, 63.29, 0.212, 0.441)),
    "vgg19": _t1("VGG-19", (73.77, 0.50, 13.32, 27.89, 58.81, 0.226, 0.474),
                 (73.99, 0.44, 12.05, 27.01, 59.14, 0.204, 0.457)),
    "regnetx": _t1("RegNet-X", (78.96, 0.11, 24.09, 31.29, 55.30, 0.436, 0.566),
                   (79.06, 0.16, 21.31, 30.04, 59.02, 0.361, 0.509)),
    "regnety": _t1("RegNet-Y", (78.21, 0.29, 25.07, 32.69, 57.94, 0.433, 0.564),
                   (78.88, 0.24, 21.39, 30.23, 59.30, 0.361, 0.510)),
    "resnext29_8x64d": _t1("ResNeXt-29 (8×64d)", (81.49, 0.39, 11.24, 26.61, 67.09, 0.168, 0.397),
                           (81.63, 0.13, 8.29, 23.93, 69.22, 0.120, 0.346)),
}


def _acc_iir(table: str, rows: tuple[tuple[str, str, float, float, float, float], ...]) -> list[PaperRow]:
    return [PaperRow(table, label, norm, {"acc": acc, "acc_std": std, "iir_train": train, "iir_test": test})
            for label, norm, acc, std, train, test in rows]


# Table 3 (ResNet-56, CIFAR-100): alternatives to the l2 normalization inside L2BN.
TABLE3 = _acc_iir("Table 3", (
    ("BN (baseline)", "bn", 72.88, 0.25, 0.726, 0.848),
    ("LNBN", "lnbn", 73.57, 0.20, 0.674, 0.802),
    ("INBN", "inbn", 69.34, 0.29, 0.739, 0.870),
    ("PNBN", "pnbn", 72.49, 0.17, 0.714, 0.846),
    ("L2BN (ours)", "l2bn", 73.92, 0.20, 0.638, 0.772),
))
# Table 5 (ResNet-56, CIFAR-100): other normalizations.
TABLE5 = _acc_iir("Table 5", (
    ("BN (baseline)", "bn", 72.88, 0.25, 0.726, 0.848),
    ("LN", "ln", 69.88, 0.15, 0.877, 0.982),
    ("IN", "in", 69.77, 0.20, 0.737, 0.871),
    ("GN-cpg4", "gn-cpg4", 70.35, 0.19, 0.746, 0.881),
    ("GN-cpg8", "gn-cpg8", 70.68, 0.51, 0.773, 0.895),
    ("SN", "sn", 72.85, 0.17, 0.691, 0.816),
    ("BCN", "bcn", 72.90, 0.20, 0.795, 0.909),
    ("BIN", "bin", 70.83, 0.14, 0.809, 0.937),
    ("L2BN (ours)", "l2bn", 73.92, 0.20, 0.638, 0.772),
))
# Table 4 (ResNet-56, CIFAR-100): L2BN in some parts only; ``norm`` holds this project's placement name.
TABLE4 = [PaperRow("Table 4", label, placement, {"acc": acc, "acc_std": std}) for label, placement, acc, std in (
    ("None (baseline)", "none", 72.88, 0.25),
    ("Only classification layer", "classifier", 73.04, 0.27),
    ("ResStage 1", "stage1", 73.59, 0.27),
    ("ResStage 2-3", "stage2-3", 73.43, 0.17),
    ("All layers", "all", 73.92, 0.20),
)]
# Table 2 (ImageNet-1K) and Table 6 (TAU Urban Acoustic Scenes 2020 Mobile): accuracy only, no std printed.
TABLE2 = [PaperRow("Table 2", f"{model} {name}", norm, {"acc": acc}) for model, name, norm, acc in (
    ("ResNet-50", "BN", "bn", 76.74), ("ResNet-50", "L2BN", "l2bn", 77.32),
    ("ResNet-101", "BN", "bn", 78.43), ("ResNet-101", "L2BN", "l2bn", 78.81),
    ("ResNeXt-50 (32×4d)", "BN", "bn", 77.86), ("ResNeXt-50 (32×4d)", "L2BN", "l2bn", 78.43),
    ("ResNeXt-101 (32×4d)", "BN", "bn", 79.14), ("ResNeXt-101 (32×4d)", "L2BN", "l2bn", 79.40),
)]
TABLE6 = [PaperRow("Table 6", f"{model} {name}", norm, {"acc": acc}) for model, name, norm, acc in (
    ("ResNet-17", "BN", "bn", 72.51), ("ResNet-17", "L2BN", "l2bn", 72.64),
    ("FCNN", "BN", "bn", 69.17), ("FCNN", "L2BN", "l2bn", 70.55),
    ("fsFCNN", "BN", "bn", 71.19), ("fsFCNN", "L2BN", "l2bn", 72.44),
)]

# The paper's CIFAR-100 recipe for the CIFAR ResNets (supplementary B, Table 1) and its angle protocol
# (supplementary A), for the pages' "paper vs here" table.
PAPER_PROTOCOL: dict[str, str] = {
    "data": "CIFAR-100 (32×32 colour, 100 classes, 50 000 training / 10 000 test images)",
    "epochs": "200 (ResNet, VGG, RegNet), 300 (DenseNet, ResNeXt)",
    "schedule": "SGD, Nesterov momentum 0.9, lr 0.1, cosine to 0 (ResNet); weight decay 5e-4",
    "augmentation": "the simple CIFAR augmentation (pad-and-crop, horizontal flip)",
    "batch": "128 (ResNet)",
    "training subset": "the whole training set",
    "angle sample": "the whole training set for the class centers and Intra(train); the test set for Intra(test)",
    "epoch selection": "not stated",
}


def paper_rows(study: str, model: str = "resnet20") -> list[PaperRow]:
    """The paper's rows that correspond to a study (Table 1's ResNet rows, the trained ``model``'s first; every
    row of Tables 3–5), or ``[]`` when the paper has none."""
    if study == "norms":
        return [*TABLE3, *(row for row in TABLE5 if row.norm not in ("bn", "l2bn"))]
    if study == "placement":
        return list(TABLE4)
    resnets = [name for name in TABLE1 if name.startswith("resnet") and not name.startswith("resnext")]
    order = [model] + [name for name in resnets if name != model] if model in TABLE1 else resnets
    return [row for name in order for row in TABLE1[name]]
