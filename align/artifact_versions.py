"""Version numbers of an artifact lineage: which ones exist, and claiming the next one for a publish.

Claiming a version number is atomic: on a local filesystem it is ``mkdir v<N>`` (fails if present);
on object stores, which have no directories, it is an exclusive create (``open(..., "xb")``) of the
sibling object ``v<N>.claim``, atomic where the backend implements conditional writes (s3fs does).
A claimed number is never handed out again, even when the publish that claimed it fails.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone

import fsspec

from align.artifact_manifest import ArtifactError

VERSION_DIR_RE = re.compile(r"v([1-9][0-9]*)")
"""The name of a version directory, ``v<N>``."""

_MAX_CLAIM_ATTEMPTS = 1000
# Anything that holds a version number: "v3" itself, "v3.claim", or a staging name "v3.<suffix>".
_VERSION_ENTRY_RE = re.compile(r"v([1-9][0-9]*)(?:\..*)?")


def version_numbers(
    fs: fsspec.AbstractFileSystem, lineage_path: str, pattern: re.Pattern[str] = VERSION_DIR_RE
) -> set[int]:
    """Numbers of the entries of ``lineage_path`` whose whole name ``pattern`` matches (none if absent)."""
    fs.invalidate_cache(lineage_path)
    try:
        entries = fs.ls(lineage_path, detail=False)
    except FileNotFoundError:
        return set()
    names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
    return {int(match.group(1)) for name in names if (match := pattern.fullmatch(name))}


def claim_next_version(
    fs: fsspec.AbstractFileSystem, root: str, lineage: str, *, local: bool
) -> tuple[int, str]:
    """Claim the version after the highest number in use under ``lineage`` (or the first free one after it,
    when other writers win it); return the number and its directory.

    ``local`` says that ``fs`` is a local filesystem, where the claim is the directory itself.
    """
    lineage_path = f"{root}/{lineage}"
    fs.makedirs(lineage_path, exist_ok=True)
    candidate = max(version_numbers(fs, lineage_path, _VERSION_ENTRY_RE), default=0) + 1
    for _ in range(_MAX_CLAIM_ATTEMPTS):
        version_path = f"{lineage_path}/v{candidate}"
        if _try_claim(fs, version_path, local):
            return candidate, version_path
        candidate += 1
    raise ArtifactError(f"could not claim a version of {lineage!r} after {_MAX_CLAIM_ATTEMPTS} attempts")


def _try_claim(fs: fsspec.AbstractFileSystem, version_path: str, local: bool) -> bool:
    if local:
        try:
            fs.mkdir(version_path, create_parents=False)  # os.mkdir: exactly one caller wins
        except FileExistsError:
            return False
        return True
    claim = {"claimed_at": datetime.now(timezone.utc).isoformat(), "claim_id": uuid.uuid4().hex}
    try:
        with fs.open(f"{version_path}.claim", "xb") as writer:
            writer.write(json.dumps(claim).encode())
    except FileExistsError:
        return False
    return True
