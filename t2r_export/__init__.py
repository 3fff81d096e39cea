"""t2r-export: finetune pretrained transformers into RNNs (T2R) and ship them as constant-memory decoders.

``import t2r_export`` registers the T2R model classes with transformers' Auto classes when torch
and transformers are installed. The decode runtime (``t2r_export.runtime``) needs neither.
"""

__version__ = "0.1.0"

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError:
    # runtime-only install (e.g. a Jetson): numpy + onnxruntime + tokenizers
    pass
else:
    from .models import register_auto_classes

    register_auto_classes()
