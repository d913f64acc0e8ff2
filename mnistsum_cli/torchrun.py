"""What torchrun's environment says about this process, read without importing torch (every
command checks it, and `--help` must stay fast)."""

from __future__ import annotations

import os
from typing import Optional

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def torchrun_rank() -> Optional[int]:
    """This process's rank when torchrun started it, else None."""
    if all(name in os.environ for name in TORCHRUN_VARIABLES):
        return int(os.environ["RANK"])
    return None
