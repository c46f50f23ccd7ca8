"""Where align keeps local state when no other location is configured."""

import os
from pathlib import Path


def home_dir() -> Path:
    """The local state folder: ``$ALIGN_HOME``, else ``./.align`` under the working directory."""
    return Path(os.environ.get("ALIGN_HOME", Path.cwd() / ".align")).absolute()


def cache_dir() -> Path:
    """Built-in model, built-in datasets and compiled ops: ``$ALIGN_CACHE_DIR``, else ``<home>/cache``."""
    return Path(os.environ.get("ALIGN_CACHE_DIR", home_dir() / "cache")).absolute()


def config_dir() -> Path:
    """Per-user settings: ``$XDG_CONFIG_HOME/align``, else ``~/.config/align`` (where gh and hf keep theirs)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return (Path(base) / "align").absolute()


def api_key_files() -> list[Path]:
    """Files the client reads an API key from, in order, after ``$ALIGN_API_KEY``: ``<home>/api_key``
    (``$ALIGN_HOME``, else ``./.align``), then ``<config>/api_key``."""
    return [home_dir() / "api_key", config_dir() / "api_key"]


def beside(location: str, folder: Path) -> str:
    """A spec's relative local path taken from ``folder`` (the spec file's); URLs, ``builtin:``/``artifact:``
    names and absolute paths stay as they are."""
    if ":" in location.split("/", 1)[0] or Path(location).is_absolute():
        return location
    return str((folder / location).resolve())


def artifact_root() -> str:
    """Default artifact store root (any fsspec URL): ``$ALIGN_ARTIFACT_ROOT``, else ``<home>/artifacts``."""
    return os.environ.get("ALIGN_ARTIFACT_ROOT", str(home_dir() / "artifacts"))
