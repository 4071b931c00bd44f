"""Module surgery lives below the converters: no import loop between convert and distributed."""
from __future__ import annotations

import ast
from pathlib import Path

import torch.nn as nn

import l2bn
import l2bn.convert
import l2bn.surgery

SRC = Path(l2bn.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports included), as written."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
            found.update("." * node.level + alias.name for alias in node.names if node.module is None)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_convert_does_not_import_distributed_even_lazily():
    imports = _imported_modules(SRC / "convert.py")
    assert not {name for name in imports if name.endswith("distributed")}, imports


def test_surgery_and_sync_kernel_import_neither_converter_nor_layer_module():
    for path in (SRC / "surgery.py", SRC / "kernels" / "sync.py"):
        imports = _imported_modules(path)
        own = {name.lstrip(".") for name in imports if name.startswith(".")}
        assert not own & {"convert", "distributed", "layers"}, path


def test_convert_reexports_the_surgery_helpers_its_users_import():
    assert l2bn.convert.swap_modules is l2bn.surgery.swap_modules
    assert l2bn.convert.rebuild_norm is l2bn.surgery.rebuild_norm
    assert l2bn.convert.BN_TO_L2BN[nn.BatchNorm2d] is l2bn.L2BatchNorm2d


def test_syncbatchnorm_still_converts_both_ways_through_the_registry():
    model = l2bn.convert_to_l2bn(nn.Sequential(nn.SyncBatchNorm(4)))
    assert type(model[0]) is l2bn.SyncL2BatchNorm
    assert type(l2bn.convert_to_bn(model)[0]) is nn.SyncBatchNorm


def test_norm_layer_alias_is_defined_once():
    definitions = [
        path for path in SRC.rglob("*.py")
        if any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NormLayer" for t in node.targets)
               for node in ast.walk(ast.parse(path.read_text())))
    ]
    assert len(definitions) == 1, definitions
