"""TensorRT: static parser-compatibility check, engine build, and a decoder with the runtime's interface.

Nothing here imports ``tensorrt`` or ``cuda`` at module level: the package, the CLI help and every
CPU test work without them. One module per job, dependencies one way (Polygraphy style: loaders
build, runners run):

- ``cuda``: the only importer of TensorRT (>= 10, JetPack >= 6.1) and cuda-python, and GPU discovery;
  missing pieces, an old TensorRT or no driver stop with :class:`TensorRTUnavailable` (one line);
- ``manifest``: the ``engines/`` folder and its manifest (what was built for which TensorRT and GPU);
- ``build``: the engine builder (uses ``cuda`` and ``manifest``);
- ``runner``: the decoder over given engine files (uses ``cuda`` and ``manifest``, never ``build``);
- ``compat``: the static ONNX-parser check (needs ``onnx`` only).

    t2r-export check BUNDLE --trt         # static check against TensorRT 10's ONNX parser
    t2r-export trt BUNDLE --fp16          # engines/step.fp16.plan, engines/prefill.fp16.plan, manifest
"""

from __future__ import annotations


class TensorRTUnavailable(RuntimeError):
    """TensorRT, cuda-python or a CUDA GPU is missing; the message is one line saying which and what to do."""


__all__ = ["TensorRTUnavailable"]
