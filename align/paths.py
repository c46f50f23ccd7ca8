"""Where align keeps local state when no other location is configured."""

import os
from pathlib import Path


def home_dir() -> Path:
    """The local state folder: ``$ALIGN_HOME``, else ``./.align`` under the working directory."""
    return Path(os.environ.get("ALIGN_HOME", Path.cwd() / ".align")).absolute()


def cache_dir() -> Path:
    """Built-in model, built-in datasets and compiled ops: ``$ALIGN_CACHE_DIR``, else ``<home>/cache``."""
    return Path(os.environ.get("ALIGN_CACHE_DIR", home_dir() / "cache")).absolute()


def artifact_root() -> str:
    """Default artifact store root (any fsspec URL): ``$ALIGN_ARTIFACT_ROOT``, else ``<home>/artifacts``."""
    return os.environ.get("ALIGN_ARTIFACT_ROOT", str(home_dir() / "artifacts"))
