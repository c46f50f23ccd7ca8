"""What an artifact version is: its manifest, its id, the hashes it records, and checks of stored or
downloaded files against it.

The store that writes and reads versions is :class:`align.artifacts.ArtifactStore`.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import MISSING, asdict, dataclass, fields
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec

ARTIFACT_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REWARD_MODEL_KIND = "reward_model"
ARTIFACT_KINDS = ("adapter", "full", REWARD_MODEL_KIND)
ARTIFACT_REF_PREFIX = "artifact:"
CHUNK_BYTES = 1 << 20
"""Files are read, hashed and copied in pieces of this many bytes."""

_MAX_NAME_LENGTH = 200
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
# The lineage may itself contain "-v<digits>-"; the id's suffix is always the last such match.
ARTIFACT_ID_RE = re.compile(r"(?P<lineage>.+)-v(?P<version>[1-9][0-9]*)-(?P<short_hash>[0-9a-f]{12})")


class ArtifactError(Exception):
    """A stored artifact is missing, incomplete, or differs from its manifest."""


class ArtifactNotFound(ArtifactError):
    """The store holds no complete artifact by that name (no manifest there); not one that is damaged."""


@dataclass(frozen=True)
class Manifest:
    """Everything needed to trust, reproduce and trace one artifact version (``manifest.json``)."""

    schema_version: int
    """Layout version of this manifest; readers refuse versions they do not know."""
    artifact_id: str
    """``<lineage>-v<version>-<first 12 hex of content_hash>``; referenced as ``artifact:<artifact_id>``."""
    lineage: str
    """Name that versions count up under, e.g. ``<job name>.<stage name>``."""
    version: int
    """1, 2, 3, ... per lineage."""
    kind: str
    """One of ``ARTIFACT_KINDS``: ``adapter`` (peft), ``full`` (all weights) or ``reward_model``."""
    stage: dict[str, Any]
    """The stage that produced it: ``{"type", "index", "name"}``, and under the service its ``stage_run_id``
    and ``attempt``."""
    job: dict[str, Any] | None
    """The job that produced it (``{"id", "name"}``), or None outside a job."""
    parents: list[str]
    """Artifact ids or URIs this one was trained from (base adapter, reference, reward model)."""
    base_model: str
    """The base model the weights belong to (local path, URL or ``builtin:...``)."""
    spec_hash: str
    """``JobSpec.hash()`` of the job spec that produced it."""
    data_fingerprints: dict[str, str]
    """Dataset name -> fingerprint of the data the stage trained on."""
    files: dict[str, dict[str, Any]]
    """Relative POSIX path -> ``{"sha256": hex, "size": bytes}`` for every file except the manifest."""
    metrics: dict[str, Any]
    """Final metrics of the stage."""
    code_version: dict[str, str | None]
    """``{"align": package version, "git_commit": HEAD of the source checkout or None}``."""
    created_at: str
    """ISO-8601 UTC time the manifest was written."""
    content_hash: str
    """``content_hash(files)``: the artifact's identity, independent of where and when it was stored."""
    precision: dict[str, Any] | None = None
    """How the stage chose its precision (:class:`align.precision.PrecisionChoice`); None outside a stage."""
    tracking: dict[str, Any] | None = None
    """Where the job's ``report_to`` sent the stage's metrics: ``{"tensorboard": "tb", "mlflow": {"tracking_uri",
    "experiment_id", "run_id"}}``, each key only when named; None when it names nothing."""
    gate: dict[str, Any] | None = None
    """The stage's evaluation gate as decided (:class:`align.gates.GateResult`: ``metric``, ``value``,
    ``baseline``, ``passed``, ``reason``); None when the stage sets no gate."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING]
        if data.get("schema_version") != ARTIFACT_SCHEMA_VERSION:
            raise ArtifactError(
                f"manifest schema_version {data.get('schema_version')!r} is not supported; "
                f"this align reads schema_version {ARTIFACT_SCHEMA_VERSION}"
            )
        missing = [name for name in required if name not in data]
        if missing:
            raise ArtifactError(f"manifest is missing field(s) {missing}")
        return cls(**{name: data[name] for name in names if name in data})


@dataclass(frozen=True)
class PublishedArtifact:
    """A complete artifact version: where it lives and what its manifest says."""

    uri: str
    """The version directory: a plain path for a local store, else a URL such as ``s3://bucket/.../v3``."""
    manifest: Manifest

    @property
    def artifact_id(self) -> str:
        return self.manifest.artifact_id

    @property
    def ref(self) -> str:
        """``artifact:<artifact_id>``, the form a job spec uses to point at this artifact."""
        return ARTIFACT_REF_PREFIX + self.manifest.artifact_id


def sha256_file(path: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; a local path when ``fs`` is None, else a path on ``fs``."""
    digest = hashlib.sha256()
    with (open(path, "rb") if fs is None else fs.open(str(path), "rb")) as reader:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(files: dict[str, dict[str, Any]]) -> str:
    """Identity of an artifact's contents: sha256 over ``path NUL sha256 LF`` lines sorted by path.

    The path is part of each line so that renaming a file changes the identity too.
    """
    digest = hashlib.sha256()
    for relative_path in sorted(files):
        digest.update(f"{relative_path}\0{files[relative_path]['sha256']}\n".encode())
    return "sha256:" + digest.hexdigest()


def make_artifact_id(lineage: str, version: int, content_hash_value: str) -> str:
    return f"{lineage}-v{version}-{content_hash_value.removeprefix('sha256:')[:12]}"


@lru_cache(maxsize=1)
def _code_version() -> tuple[str | None, str | None]:
    try:
        package_version = metadata.version("align")
    except metadata.PackageNotFoundError:
        package_version = None
    return package_version, _git_commit(Path(__file__).resolve().parent)


def code_version() -> dict[str, str | None]:
    """The running align: package version and, for a source checkout, its git commit."""
    package_version, commit = _code_version()
    return {"align": package_version, "git_commit": commit}


def _git_commit(package_dir: Path) -> str | None:
    # Only trust the commit if the repository is align's own checkout, not some repo a venv sits in.
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=package_dir, capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2:
        return None
    toplevel, commit = lines
    if Path(toplevel).resolve() != package_dir.parent or not re.fullmatch(r"[0-9a-f]{40,64}", commit):
        return None
    return commit


def check_name(field_name: str, value: Any) -> str:
    """Return ``value`` if it is safe as one path component, else raise a ValueError naming the field."""
    if (
        not isinstance(value, str)
        or not _NAME_RE.fullmatch(value)
        or ".." in value
        or value.startswith(".")
        or len(value) > _MAX_NAME_LENGTH
    ):
        raise ValueError(
            f"{field_name} {value!r} is not a valid name: use 1-{_MAX_NAME_LENGTH} characters from "
            "A-Z a-z 0-9 . _ -, not starting with '.', with no '/' and no '..'"
        )
    return value


def json_default(value: Any) -> Any:
    """``json.dumps`` default for manifest values: numpy and torch scalars as numbers, paths as text."""
    # numpy and torch scalars show up in metrics; store them as plain numbers.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be stored in a manifest")


def manifest_bytes(manifest: Manifest) -> bytes:
    """The text of ``manifest.json``: indented JSON with sorted keys and a final newline."""
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=json_default) + "\n").encode()


def check_manifest_identity(manifest: Manifest) -> None:
    """Raise ArtifactError unless the manifest's content_hash and artifact_id follow from its file list."""
    if content_hash(manifest.files) != manifest.content_hash:
        raise ArtifactError(
            f"{manifest.artifact_id}: {MANIFEST} content_hash {manifest.content_hash} does not match its file list"
        )
    expected_id = make_artifact_id(manifest.lineage, manifest.version, manifest.content_hash)
    if manifest.artifact_id != expected_id:
        raise ArtifactError(f"{MANIFEST} artifact_id {manifest.artifact_id!r} should be {expected_id!r}")


def check_local_copy(target: Path, manifest: Manifest) -> None:
    """Raise ArtifactError unless the folder ``target`` holds exactly this artifact's files, intact."""
    manifest_path = target / MANIFEST
    try:
        local_id = json.loads(manifest_path.read_text()).get("artifact_id")
    except (OSError, ValueError):
        local_id = None
    if local_id != manifest.artifact_id:
        raise ArtifactError(f"download target {target} is not empty and does not hold {manifest.artifact_id}")
    local_files = {
        p.relative_to(target).as_posix(): p.stat().st_size for p in target.rglob("*") if p.is_file()
    }
    local_files.pop(MANIFEST, None)
    problems = file_set_problems(manifest, local_files)
    for relative in sorted(manifest.files.keys() - problems.keys()):
        if sha256_file(target / relative) != manifest.files[relative]["sha256"]:
            problems[relative] = "sha256 differs from the manifest"
    raise_problems(f"local copy {target} of {manifest.artifact_id} is damaged", problems)


def file_set_problems(manifest: Manifest, stored_sizes: dict[str, int]) -> dict[str, str]:
    """Relative path -> problem, for files missing, extra or of another size than the manifest says."""
    problems = dict.fromkeys(manifest.files.keys() - stored_sizes.keys(), "missing")
    problems.update(dict.fromkeys(stored_sizes.keys() - manifest.files.keys(), "extra file not in the manifest"))
    for relative in manifest.files.keys() & stored_sizes.keys():
        expected_size = manifest.files[relative]["size"]
        if stored_sizes[relative] != expected_size:
            problems[relative] = f"size {stored_sizes[relative]} but the manifest says {expected_size}"
    return problems


def raise_problems(context: str, problems: dict[str, str]) -> None:
    """Raise one ArtifactError that lists every problem after ``context``; nothing if there are none."""
    if problems:
        details = "; ".join(f"{relative}: {problem}" for relative, problem in sorted(problems.items()))
        raise ArtifactError(f"{context}: {details}")
