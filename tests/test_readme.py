"""Every Python snippet of README.md, and every docstring example of the public API, runs as written."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code):
    for package in re.findall(r"^import (\w+)", code, flags=re.M):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the snippet needs {package}, which is not installed")
    exec(compile(code, str(README), "exec"), {"__name__": "readme_snippet"})


@pytest.mark.parametrize("module", ["l2bn.layers", "l2bn.functional", "l2bn.convert", "l2bn.distributed", "l2bn.norm_act",
                                    "l2bn.lightning_sync"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    import torch

    needs = {"l2bn.norm_act": "timm", "l2bn.lightning_sync": "lightning"}.get(module)
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{module} needs {needs}")
    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
