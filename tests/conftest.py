"""Suite-wide set-up that must happen before any test module imports torch, torchvision or triton."""
import inspect
import os
from pathlib import Path

import pytest

# Triton decides "compiled or interpreted" at import time (torchvision imports it). Without an NVIDIA GPU,
# ask for the interpreter, so the Triton kernels are tested on CPU tensors in this process.
if "TRITON_INTERPRET" not in os.environ and not Path("/dev/nvidia0").exists():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip ``needs_batchnorm_bias`` tests where torch's BatchNorm has no ``bias=`` keyword (older torch)."""
    if item.get_closest_marker("needs_batchnorm_bias") is None:
        return
    import torch.nn as nn

    if "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters:
        pytest.skip("this torch's BatchNorm takes no bias= keyword")


@pytest.fixture
def seeded() -> None:
    """torch's global generator seeded with 0 (modules use it with ``pytestmark = pytest.mark.usefixtures("seeded")``)."""
    import torch

    torch.manual_seed(0)
