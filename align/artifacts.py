"""Versioned, content-hashed stage outputs on any fsspec filesystem (a local folder, ``s3://``, ...).

Layout under the store root::

    <root>/<lineage>/v<N>/<files...>          the stage's output, copied as it was on disk
    <root>/<lineage>/v<N>/manifest.json       written last: the completeness marker

A version directory without ``manifest.json`` is an upload in progress or one that failed: readers
skip it, and its version number is never handed out again. Versions are never overwritten.

Claiming a version number is atomic: on a local filesystem it is ``mkdir v<N>`` (fails if present);
on object stores, which have no directories, it is an exclusive create (``open(..., "xb")``) of the
sibling object ``v<N>.claim``, atomic where the backend implements conditional writes (s3fs does).
Only fsspec filesystem methods touch the store, so any fsspec URL works as a root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from align.paths import cache_dir

logger = logging.getLogger(__name__)

ARTIFACT_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ARTIFACT_KINDS = ("adapter", "full", "reward_model")
ARTIFACT_REF_PREFIX = "artifact:"

_CHUNK_BYTES = 1 << 20
_MAX_NAME_LENGTH = 200
_MAX_CLAIM_ATTEMPTS = 1000
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_VERSION_DIR_RE = re.compile(r"v([1-9][0-9]*)")
# Anything that holds a version number: "v3" itself, "v3.claim", or a staging name "v3.<suffix>".
_VERSION_ENTRY_RE = re.compile(r"v([1-9][0-9]*)(?:\..*)?")
# The lineage may itself contain "-v<digits>-"; the id's suffix is always the last such match.
_ARTIFACT_ID_RE = re.compile(r"(?P<lineage>.+)-v(?P<version>[1-9][0-9]*)-(?P<short_hash>[0-9a-f]{12})")


class ArtifactError(Exception):
    """A stored artifact is missing, incomplete, or differs from its manifest."""


@dataclass(frozen=True)
class Manifest:
    """Everything needed to trust, reproduce and trace one artifact version (``manifest.json``)."""

    schema_version: int
    """Layout version of this manifest; readers refuse versions they do not know."""
    artifact_id: str
    """``<lineage>-v<version>-<first 12 hex of content_hash>``; referenced as ``artifact:<artifact_id>``."""
    lineage: str
    """Name that versions count up under, e.g. ``<job name>-<stage name>``."""
    version: int
    """1, 2, 3, ... per lineage."""
    kind: str
    """One of ``ARTIFACT_KINDS``: ``adapter`` (peft), ``full`` (all weights) or ``reward_model``."""
    stage: dict[str, Any]
    """The stage that produced it: ``{"type", "index", "name"}``."""
    job: dict[str, Any] | None
    """The job that produced it (``{"id", "name"}``), or None outside a job."""
    parents: list[str]
    """Artifact ids or URIs this one was trained from (base adapter, reference, reward model)."""
    base_model: str
    """The base model the weights belong to (local path, URL or ``builtin:...``)."""
    spec_hash: str
    """``hash_spec`` of the job spec that produced it."""
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
        while chunk := reader.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def hash_spec(obj: dict[str, Any]) -> str:
    """``"sha256:" + sha256`` of canonical JSON (sorted keys, no whitespace): independent of key order."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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


def _json_default(value: Any) -> Any:
    # numpy and torch scalars show up in metrics; store them as plain numbers.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be stored in a manifest")


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def _list_local_files(local_dir: Path) -> list[tuple[str, Path]]:
    if not local_dir.is_dir():
        raise ValueError(f"local_dir {str(local_dir)!r} is not a directory")
    found = sorted((p.relative_to(local_dir).as_posix(), p) for p in local_dir.rglob("*") if p.is_file())
    if not found:
        raise ValueError(f"local_dir {str(local_dir)!r} holds no files; an artifact needs at least one")
    if any(relative_path == MANIFEST for relative_path, _ in found):
        raise ValueError(f"local_dir {str(local_dir)!r} already holds {MANIFEST}; the store writes that file")
    return found


def _fsync(file_obj: Any) -> None:
    file_obj.flush()
    os.fsync(file_obj.fileno())


def _check_manifest_identity(manifest: Manifest) -> None:
    if content_hash(manifest.files) != manifest.content_hash:
        raise ArtifactError(
            f"{manifest.artifact_id}: {MANIFEST} content_hash {manifest.content_hash} does not match its file list"
        )
    expected_id = make_artifact_id(manifest.lineage, manifest.version, manifest.content_hash)
    if manifest.artifact_id != expected_id:
        raise ArtifactError(f"{MANIFEST} artifact_id {manifest.artifact_id!r} should be {expected_id!r}")


class ArtifactStore:
    """Publish and read artifact versions under one fsspec root, e.g. ``/data/artifacts`` or ``s3://bucket/a``.

    ``storage_options`` go to the fsspec filesystem (credentials, endpoint, ...).
    """

    def __init__(self, root: str | Path, **storage_options: Any) -> None:
        self.fs, root_path = fsspec.core.url_to_fs(str(root), **storage_options)
        self._root = root_path.rstrip("/")
        self._is_local = isinstance(self.fs, LocalFileSystem)

    @property
    def root_uri(self) -> str:
        return self._uri(self._root or "/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_uri!r})"

    # ---- writing -------------------------------------------------------------------------------------

    def publish(
        self,
        local_dir: str | Path,
        *,
        lineage: str,
        kind: str,
        stage: dict[str, Any],
        base_model: str,
        spec_hash: str,
        parents: Sequence[str] = (),
        data_fingerprints: dict[str, str] | None = None,
        metrics: dict[str, Any] | None = None,
        job: dict[str, Any] | None = None,
        precision: dict[str, Any] | None = None,
    ) -> PublishedArtifact:
        """Copy every file under ``local_dir`` into the next version of ``lineage``; the manifest goes last."""
        check_name("lineage", lineage)
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"kind {kind!r} is not one of {list(ARTIFACT_KINDS)}")
        if not isinstance(stage, dict) or {"type", "index", "name"} - stage.keys():
            raise ValueError(f"stage {stage!r} must be a dict with keys 'type', 'index' and 'name'")
        if job is not None and not isinstance(job, dict):
            raise ValueError(f"job {job!r} must be a dict such as {{'id': ..., 'name': ...}} or None")
        if isinstance(parents, str):
            raise TypeError(f"parents {parents!r} must be a list of artifact ids or URIs, not one string")
        sources = _list_local_files(Path(local_dir))
        header = {
            "stage": dict(stage), "job": None if job is None else dict(job), "parents": list(parents),
            "data_fingerprints": dict(data_fingerprints or {}), "metrics": dict(metrics or {}),
            "precision": None if precision is None else dict(precision),
        }
        # Fail on values JSON cannot hold before a version number is spent.
        json.dumps(header, default=_json_default)

        version, version_path = self._claim_next_version(lineage)
        try:
            files = {relative: self._upload(source, version_path, relative) for relative, source in sources}
            if self._is_local:
                self._fsync_local_dir(version_path)
            hash_value = content_hash(files)
            manifest = Manifest(
                schema_version=ARTIFACT_SCHEMA_VERSION,
                artifact_id=make_artifact_id(lineage, version, hash_value),
                lineage=lineage,
                version=version,
                kind=kind,
                base_model=base_model,
                spec_hash=spec_hash,
                files=files,
                code_version=code_version(),
                created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                content_hash=hash_value,
                **header,
            )
            self._write_manifest(version_path, manifest)
        except Exception:
            self._discard_upload(version_path)
            raise
        logger.info("published %s at %s", manifest.artifact_id, self._uri(version_path))
        return PublishedArtifact(self._uri(version_path), manifest)

    def _claim_next_version(self, lineage: str) -> tuple[int, str]:
        lineage_path = f"{self._root}/{lineage}"
        self.fs.makedirs(lineage_path, exist_ok=True)
        candidate = max(self._version_numbers(lineage_path, _VERSION_ENTRY_RE), default=0) + 1
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            version_path = f"{lineage_path}/v{candidate}"
            if self._try_claim(version_path):
                return candidate, version_path
            candidate += 1
        raise ArtifactError(f"could not claim a version of {lineage!r} after {_MAX_CLAIM_ATTEMPTS} attempts")

    def _try_claim(self, version_path: str) -> bool:
        if self._is_local:
            try:
                self.fs.mkdir(version_path, create_parents=False)  # os.mkdir: exactly one caller wins
            except FileExistsError:
                return False
            return True
        claim = {"claimed_at": datetime.now(timezone.utc).isoformat(), "claim_id": uuid.uuid4().hex}
        try:
            with self.fs.open(f"{version_path}.claim", "xb") as writer:
                writer.write(json.dumps(claim).encode())
        except FileExistsError:
            return False
        return True

    def _upload(self, source: Path, version_path: str, relative: str) -> dict[str, Any]:
        destination = f"{version_path}/{relative}"
        if "/" in relative:
            self.fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        # Hash the bytes as they are sent, so the manifest describes exactly what was stored.
        with open(source, "rb") as reader, self.fs.open(destination, "wb") as writer:
            while chunk := reader.read(_CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
            if self._is_local:
                _fsync(writer)
        return {"sha256": digest.hexdigest(), "size": size}

    def _write_manifest(self, version_path: str, manifest: Manifest) -> None:
        payload = _manifest_bytes(manifest)
        final_path = f"{version_path}/{MANIFEST}"
        if not self._is_local:
            # One object PUT: readers see the whole manifest or none of it.
            with self.fs.open(final_path, "wb") as writer:
                writer.write(payload)
            return
        staging_path = f"{version_path}/.{MANIFEST}.{uuid.uuid4().hex}"
        with self.fs.open(staging_path, "wb") as writer:
            writer.write(payload)
            _fsync(writer)
        self.fs.mv(staging_path, final_path)  # rename(2): atomic within one filesystem
        self._fsync_local_dir(version_path)

    @staticmethod
    def _fsync_local_dir(path: str) -> None:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def _discard_upload(self, version_path: str) -> None:
        # Remove what was copied but keep the claim (the local dir or the .claim object): numbers are never reused.
        try:
            for child in self.fs.ls(version_path, detail=False):
                self.fs.rm(child, recursive=True)
        except Exception:  # cleanup must not hide the error that caused it
            logger.warning("could not clean up incomplete upload %s", self._uri(version_path), exc_info=True)

    # ---- reading -------------------------------------------------------------------------------------

    def list_versions(self, lineage: str) -> list[int]:
        """Complete versions of ``lineage`` (those with a manifest), ascending; [] for an unknown lineage."""
        lineage_path = f"{self._root}/{check_name('lineage', lineage)}"
        numbers = sorted(self._version_numbers(lineage_path, _VERSION_DIR_RE))
        return [n for n in numbers if self.fs.exists(f"{lineage_path}/v{n}/{MANIFEST}")]

    def latest(self, lineage: str) -> PublishedArtifact | None:
        """The highest complete version of ``lineage``, or None if it has none."""
        versions = self.list_versions(lineage)
        return self._load(lineage, versions[-1]) if versions else None

    def get(self, uri_or_id: str) -> PublishedArtifact:
        """Resolve ``artifact:<artifact_id>`` or a version directory URI of this store to a complete artifact."""
        if not uri_or_id.startswith(ARTIFACT_REF_PREFIX):
            return self._load(*self._parse_uri(uri_or_id))
        artifact_id = uri_or_id[len(ARTIFACT_REF_PREFIX):]
        match = _ARTIFACT_ID_RE.fullmatch(artifact_id)
        if match is None:
            raise ArtifactError(
                f"{uri_or_id!r} is not an artifact reference of the form artifact:<lineage>-v<version>-<12 hex>"
            )
        lineage, version = match["lineage"], int(match["version"])
        try:
            artifact = self._load(check_name("lineage", lineage), version)
        except (ArtifactError, ValueError):
            raise ArtifactError(f"no artifact {artifact_id!r} in {self.root_uri}") from None
        if artifact.manifest.artifact_id != artifact_id:
            raise ArtifactError(
                f"no artifact {artifact_id!r} in {self.root_uri}: "
                f"{lineage} v{version} is {artifact.manifest.artifact_id!r}"
            )
        return artifact

    def verify(self, uri: str) -> None:
        """Raise ArtifactError naming every file that is missing, extra, or differs in size or sha256."""
        artifact = self.get(uri)
        version_path = self._version_path(artifact.manifest)
        problems = self._listing_problems(artifact.manifest, version_path)
        for relative, expected in sorted(artifact.manifest.files.items()):
            if relative in problems:
                continue
            actual = sha256_file(f"{version_path}/{relative}", fs=self.fs)
            if actual != expected["sha256"]:
                problems[relative] = f"sha256 {actual} but the manifest says {expected['sha256']}"
        _raise_problems(f"artifact {artifact.uri} failed verification", problems)

    def download(self, uri: str, local_dir: str | Path | None = None) -> Path:
        """Copy a complete artifact into ``local_dir`` and check every file's sha256; return the folder.

        With ``local_dir=None`` a local store verifies and returns the version directory itself; a remote
        store copies into ``<cache>/artifacts/<artifact_id>`` and reuses an intact copy already there.
        An existing non-empty ``local_dir`` is accepted only if it already holds this artifact intact.
        """
        artifact = self.get(uri)
        manifest = artifact.manifest
        version_path = self._version_path(manifest)
        if local_dir is None and self._is_local:
            self.verify(artifact.uri)
            return Path(version_path)
        target = Path(local_dir) if local_dir is not None else cache_dir() / "artifacts" / manifest.artifact_id
        if target.is_dir() and any(target.iterdir()):
            self._check_local_copy(target, manifest)
            return target

        _raise_problems(f"artifact {artifact.uri} failed verification", self._listing_problems(manifest, version_path))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for relative, expected in sorted(manifest.files.items()):
                self._fetch(f"{version_path}/{relative}", staging / relative, relative, expected)
            self.fs.get_file(f"{version_path}/{MANIFEST}", str(staging / MANIFEST))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            if target.is_dir():
                target.rmdir()  # empty, checked above; renaming onto it needs it gone
            staging.rename(target)
        except OSError:
            # A concurrent download of the same artifact finished first; keep its copy if it is intact.
            shutil.rmtree(staging, ignore_errors=True)
            self._check_local_copy(target, manifest)
        return target

    # ---- helpers -------------------------------------------------------------------------------------

    def _uri(self, path: str) -> str:
        return path if self._is_local else self.fs.unstrip_protocol(path)

    def _version_path(self, manifest: Manifest) -> str:
        return f"{self._root}/{manifest.lineage}/v{manifest.version}"

    def _version_numbers(self, lineage_path: str, pattern: re.Pattern[str]) -> set[int]:
        self.fs.invalidate_cache(lineage_path)
        try:
            entries = self.fs.ls(lineage_path, detail=False)
        except FileNotFoundError:
            return set()
        names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
        return {int(match.group(1)) for name in names if (match := pattern.fullmatch(name))}

    def _parse_uri(self, uri: str) -> tuple[str, int]:
        path = self.fs._strip_protocol(str(uri)).rstrip("/")
        prefix = self._root + "/"
        if not path.startswith(prefix):
            raise ArtifactError(f"{uri!r} is not inside this artifact store ({self.root_uri})")
        parts = path[len(prefix):].split("/")
        if len(parts) != 2 or not _VERSION_DIR_RE.fullmatch(parts[1]):
            raise ArtifactError(f"{uri!r} is not an artifact version directory <root>/<lineage>/v<N>")
        try:
            lineage = check_name("lineage", parts[0])
        except ValueError as error:
            raise ArtifactError(f"{uri!r}: {error}") from None
        return lineage, int(parts[1][1:])

    def _load(self, lineage: str, version: int) -> PublishedArtifact:
        version_path = f"{self._root}/{lineage}/v{version}"
        try:
            with self.fs.open(f"{version_path}/{MANIFEST}", "rb") as reader:
                data = json.load(reader)
        except FileNotFoundError:
            raise ArtifactError(
                f"{self._uri(version_path)} is not a complete artifact: it has no {MANIFEST}"
            ) from None
        except json.JSONDecodeError as error:
            raise ArtifactError(f"{self._uri(version_path)}/{MANIFEST} is not valid JSON: {error}") from None
        manifest = Manifest.from_dict(data)
        if (manifest.lineage, manifest.version) != (lineage, version):
            raise ArtifactError(
                f"{self._uri(version_path)}/{MANIFEST} describes {manifest.lineage} v{manifest.version}, "
                f"not {lineage} v{version}"
            )
        _check_manifest_identity(manifest)
        return PublishedArtifact(self._uri(version_path), manifest)

    def _listing_problems(self, manifest: Manifest, version_path: str) -> dict[str, str]:
        """Relative path -> problem, for files that are missing, extra or of the wrong size."""
        self.fs.invalidate_cache(version_path)
        listing = self.fs.find(version_path, detail=True)
        stored = {path[len(version_path) + 1:]: info["size"] for path, info in listing.items()}
        stored.pop(MANIFEST, None)
        return _file_set_problems(manifest, stored)

    def _fetch(self, source: str, destination: Path, relative: str, expected: dict[str, Any]) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with self.fs.open(source, "rb") as reader, open(destination, "wb") as writer:
            while chunk := reader.read(_CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
        if digest.hexdigest() != expected["sha256"]:
            raise ArtifactError(
                f"{relative}: sha256 {digest.hexdigest()} but the manifest says {expected['sha256']}"
            )

    @staticmethod
    def _check_local_copy(target: Path, manifest: Manifest) -> None:
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
        problems = _file_set_problems(manifest, local_files)
        for relative in sorted(manifest.files.keys() - problems.keys()):
            if sha256_file(target / relative) != manifest.files[relative]["sha256"]:
                problems[relative] = "sha256 differs from the manifest"
        _raise_problems(f"local copy {target} of {manifest.artifact_id} is damaged", problems)


def _file_set_problems(manifest: Manifest, stored_sizes: dict[str, int]) -> dict[str, str]:
    problems = {relative: "missing" for relative in manifest.files.keys() - stored_sizes.keys()}
    problems.update({relative: "extra file not in the manifest" for relative in stored_sizes.keys() - manifest.files.keys()})
    for relative in manifest.files.keys() & stored_sizes.keys():
        expected_size = manifest.files[relative]["size"]
        if stored_sizes[relative] != expected_size:
            problems[relative] = f"size {stored_sizes[relative]} but the manifest says {expected_size}"
    return problems


def _raise_problems(context: str, problems: dict[str, str]) -> None:
    if problems:
        details = "; ".join(f"{relative}: {problem}" for relative, problem in sorted(problems.items()))
        raise ArtifactError(f"{context}: {details}")
