"""Suite-wide set-up that must happen before any test module imports torch, torchvision or triton."""
import os
from pathlib import Path

# Triton decides "compiled or interpreted" at import time (torchvision imports it). Without an NVIDIA GPU,
# ask for the interpreter, so the Triton kernels are tested on CPU tensors in this process.
if "TRITON_INTERPRET" not in os.environ and not Path("/dev/nvidia0").exists():
    os.environ["TRITON_INTERPRET"] = "1"
