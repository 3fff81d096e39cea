"""t2r-export: finetune pretrained transformers into RNNs (T2R) and ship them as constant-memory decoders.

``import t2r_export`` imports neither torch nor transformers, so the CLI's help and the torch-free
decode runtime (``t2r_export.runtime``) start fast on a machine that has them installed. The T2R
model classes are registered with transformers' Auto classes when ``t2r_export.models`` is
imported (every torch-side command does).
"""

__version__ = "0.1.0"

from .interrupt import install_startup_handler as _install_startup_handler, is_command_line as _is_command_line

# the command line answers Ctrl-C with one line even while its heavy imports are still loading
if _is_command_line():
    _install_startup_handler()
