"""``python -m t2r_export ...`` is ``t2r-export ...`` (and ``torchrun -m t2r_export finetune ...`` works)."""

from .cli import main

main()
