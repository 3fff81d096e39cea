"""t2r-export: finetune pretrained transformers into RNNs (T2R) and ship them as constant-memory decoders.

``import t2r_export`` registers the T2R model classes with transformers' Auto classes when torch
and transformers are installed. The decode runtime (``t2r_export.runtime``) needs neither.
"""

__version__ = "0.1.0"

from .interrupt import install_startup_handler as _install_startup_handler, is_command_line as _is_command_line

# the command line answers Ctrl-C with one line even while torch is still importing
if _is_command_line():
    _install_startup_handler()

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError:
    # runtime-only install (e.g. a Jetson): numpy + onnxruntime + tokenizers
    pass
else:
    from .models import register_auto_classes

    register_auto_classes()
