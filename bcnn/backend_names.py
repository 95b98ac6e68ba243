"""The names of the places a forward pass can run, which settings choose from: torch-free, so that a configuration
is validated where torch is not loaded. `bcnn.backends` builds them."""

from __future__ import annotations

from typing import Literal, get_args

BackendName = Literal["auto", "torch", "onnxruntime"]
"""`auto`: ONNX Runtime on the CPU where it is installed, torch on CUDA"""
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
