"""DeepSpeed engines built from the job spec, checkpoints, and metrics.

Importing this package points DeepSpeed's compiled-op cache at align's own cache (:func:`use_op_cache`).
"""

from __future__ import annotations

import os
from pathlib import Path

from align.paths import cache_dir


def use_op_cache() -> Path:
    """Set ``$TORCH_EXTENSIONS_DIR`` to ``cache_dir()/torch_extensions`` unless the user set it; return the folder.

    torch's extension loader, through which DeepSpeed builds ops such as CPU Adam, reads the variable at
    each compile, so it must be set before the first one. This package calls it on import; the ops are
    built by ``deepspeed.initialize`` in :mod:`align.engine.build`, which imports it first. Left unset,
    ops compile into ``~/.cache/torch_extensions`` and each new home folder or container compiles them again.
    """
    return Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")))


use_op_cache()
