"""``l2bn geometry``: the paper's identity-layer experiments (Fig. 2, 4, 5) as tables and PNG figures."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from .. import geometry
from ..geometry import (
    DEFAULT_CENTERS,
    DEFAULT_INTRA_CLASS,
    DEFAULT_OTHERS,
    NORMS,
    intra_class_spread,
    min_center_angles,
    write_figures,
)


def _parse_matrix(text: str) -> Tensor:
    try:
        rows = [[float(v) for v in row.split(",")] for row in text.split(";") if row.strip()]
        matrix = torch.tensor(rows, dtype=torch.float64)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected rows like '1,0.2;0.8,1;3,2.5', got {text!r} ({err})") from None
    if matrix.dim() != 2 or matrix.shape[0] < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 rows of equal length, got {text!r}")
    if not bool(torch.isfinite(matrix).all()) or bool((matrix == 0).all(dim=1).any()):
        raise argparse.ArgumentTypeError(f"every center must be finite and non-zero (it needs a direction), got {text!r}")
    return matrix


def _num_layers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _table(title: str, curves: dict[str, list[float]]) -> str:
    lines = [title, "layer " + "".join(f"{n.upper():>10}" for n in curves)]
    for i, values in enumerate(zip(*curves.values())):
        lines.append(f"{i:>5} " + "".join(f"{v:>10.2f}" for v in values))
    return "\n".join(lines)


def run_geometry(args: argparse.Namespace) -> int:
    """``l2bn geometry``: print the per-layer tables and write the figures."""
    centers = args.centers if args.centers is not None else DEFAULT_CENTERS
    curves = {n: min_center_angles(centers, args.num_layers, n) for n in NORMS}  # ValueError: a center mapped to 0
    print(_table("Minimum angle between class centers (degrees) after identity layers", curves))
    intra = {n: intra_class_spread(DEFAULT_INTRA_CLASS, DEFAULT_OTHERS, args.num_layers, n) for n in NORMS}
    print()
    print(_table("Largest angle within one class of same-direction vectors (degrees)", intra))
    print()
    for path in write_figures(args.out, centers, args.num_layers):
        print(f"wrote {path}")
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``geometry`` on the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "geometry",
        help="identity-layer experiments of the paper (Fig. 2, 4, 5): tables and PNG figures",
        description=geometry.__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the PNG figures")
    p.add_argument("--num-layers", type=_num_layers, default=12, help="identity layers to stack (default: 12)")
    p.add_argument("--centers", type=_parse_matrix, default=None,
                   help="class centers as 'x,y;x,y;...' (default: three 2-D centers of unequal norms)")
    p.set_defaults(func=run_geometry)
