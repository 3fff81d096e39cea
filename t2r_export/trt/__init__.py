"""TensorRT: static parser-compatibility check, engine build, and a decoder with the runtime's interface.

Nothing here imports ``tensorrt`` or ``cuda`` at module level: the package, the CLI help and every
CPU test work without them. ``compat`` needs ``onnx``; ``build`` and ``runner`` import TensorRT and
cuda-python inside the functions that use them and stop with :class:`TensorRTUnavailable` (one
line) when either is missing or no CUDA GPU is visible.

    t2r-export check BUNDLE --trt         # static check against TensorRT 10's ONNX parser
    t2r-export trt BUNDLE --fp16          # engines/step.fp16.plan, engines/prefill.fp16.plan, manifest
"""

from __future__ import annotations


class TensorRTUnavailable(RuntimeError):
    """TensorRT, cuda-python or a CUDA GPU is missing; the message is one line saying which and what to do."""


__all__ = ["TensorRTUnavailable"]
