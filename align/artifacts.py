"""Versioned, content-hashed stage outputs on any fsspec filesystem (a local folder, ``s3://``, ...).

Layout under the store root::

    <root>/<lineage>/v<N>/<files...>          the stage's output, copied as it was on disk
    <root>/<lineage>/v<N>/manifest.json       written last: the completeness marker

A version directory without ``manifest.json`` is an upload in progress or one that failed: readers
skip it, and its version number is never handed out again. Versions are never overwritten.

Claiming a version number is atomic (:mod:`align.artifact_versions`); what a version holds, and the
checks of its files, are in :mod:`align.artifact_manifest`. Only fsspec filesystem methods touch the
store, so any fsspec URL works as a root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from align.artifact_manifest import (
    ARTIFACT_ID_RE,
    ARTIFACT_KINDS,
    ARTIFACT_REF_PREFIX,
    ARTIFACT_SCHEMA_VERSION,
    CHUNK_BYTES,
    MANIFEST,
    ArtifactError,
    ArtifactNotFound,
    Manifest,
    PublishedArtifact,
    check_local_copy,
    check_manifest_identity,
    check_name,
    code_version,
    content_hash,
    file_set_problems,
    json_default,
    make_artifact_id,
    manifest_bytes,
    raise_problems,
    sha256_file,
)
from align.artifact_versions import VERSION_DIR_RE, claim_next_version, version_numbers
from align.paths import cache_dir

__all__ = [
    "ARTIFACT_KINDS",
    "ARTIFACT_REF_PREFIX",
    "ARTIFACT_SCHEMA_VERSION",
    "MANIFEST",
    "ArtifactError",
    "ArtifactNotFound",
    "ArtifactStore",
    "Manifest",
    "PublishedArtifact",
    "check_name",
    "code_version",
    "content_hash",
    "make_artifact_id",
    "sha256_file",
]

logger = logging.getLogger(__name__)


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
        tracking: dict[str, Any] | None = None,
        gate: dict[str, Any] | None = None,
    ) -> PublishedArtifact:
        """Copy every file under ``local_dir`` into the next version of ``lineage``; the manifest goes last.

        A ``stage`` that names its ``stage_run_id`` and ``attempt`` publishes once per attempt: when a
        complete version of ``lineage`` already records the same pair (the attempt published, then its
        report was lost and it ran again), that version is returned and nothing is copied."""
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
        if "stage_run_id" in stage and "attempt" in stage:
            earlier = self.published_by(lineage, stage["stage_run_id"], stage["attempt"])
            if earlier is not None:
                logger.info("reusing %s, already published by %s attempt %s", earlier.manifest.artifact_id,
                            stage["stage_run_id"], stage["attempt"])
                return earlier
        header = {
            "stage": dict(stage), "job": None if job is None else dict(job), "parents": list(parents),
            "data_fingerprints": dict(data_fingerprints or {}), "metrics": dict(metrics or {}),
            "precision": None if precision is None else dict(precision),
            "tracking": None if tracking is None else dict(tracking),
            "gate": None if gate is None else dict(gate),
        }
        # Fail on values JSON cannot hold before a version number is spent.
        json.dumps(header, default=json_default)

        version, version_path = claim_next_version(self.fs, self._root, lineage, local=self._is_local)
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

    def _upload(self, source: Path, version_path: str, relative: str) -> dict[str, Any]:
        destination = f"{version_path}/{relative}"
        if "/" in relative:
            self.fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        # Hash the bytes as they are sent, so the manifest describes exactly what was stored.
        with open(source, "rb") as reader, self.fs.open(destination, "wb") as writer:
            while chunk := reader.read(CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
            if self._is_local:
                _fsync(writer)
        return {"sha256": digest.hexdigest(), "size": size}

    def _write_manifest(self, version_path: str, manifest: Manifest) -> None:
        payload = manifest_bytes(manifest)
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
        numbers = sorted(version_numbers(self.fs, lineage_path))
        return [n for n in numbers if self.fs.exists(f"{lineage_path}/v{n}/{MANIFEST}")]

    def published_by(self, lineage: str, stage_run_id: str, attempt: int) -> PublishedArtifact | None:
        """The complete version of ``lineage`` whose manifest records this stage run and attempt, if any."""
        for version in reversed(self.list_versions(lineage)):
            artifact = self._load(lineage, version)
            stage = artifact.manifest.stage or {}
            if stage.get("stage_run_id") == stage_run_id and stage.get("attempt") == attempt:
                return artifact
        return None

    def latest(self, lineage: str) -> PublishedArtifact | None:
        """The highest complete version of ``lineage``, or None if it has none."""
        versions = self.list_versions(lineage)
        return self._load(lineage, versions[-1]) if versions else None

    def get(self, uri_or_id: str) -> PublishedArtifact:
        """Resolve ``artifact:<artifact_id>`` or a version directory URI of this store to a complete artifact."""
        if not uri_or_id.startswith(ARTIFACT_REF_PREFIX):
            return self._load(*self._parse_uri(uri_or_id))
        artifact_id = uri_or_id[len(ARTIFACT_REF_PREFIX):]
        match = ARTIFACT_ID_RE.fullmatch(artifact_id)
        if match is None:
            raise ArtifactError(
                f"{uri_or_id!r} is not an artifact reference of the form artifact:<lineage>-v<version>-<12 hex>"
            )
        lineage, version = match["lineage"], int(match["version"])
        try:
            artifact = self._load(check_name("lineage", lineage), version)
        except (ArtifactNotFound, ValueError):
            raise ArtifactNotFound(f"no artifact {artifact_id!r} in {self.root_uri}") from None
        except ArtifactError as error:  # there, but its manifest is damaged: say so rather than "no artifact"
            raise ArtifactError(f"artifact {artifact_id!r} in {self.root_uri} is damaged: {error}") from None
        if artifact.manifest.artifact_id != artifact_id:
            raise ArtifactNotFound(
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
        raise_problems(f"artifact {artifact.uri} failed verification", problems)

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
            check_local_copy(target, manifest)
            return target

        raise_problems(f"artifact {artifact.uri} failed verification", self._listing_problems(manifest, version_path))
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
            check_local_copy(target, manifest)
        return target

    # ---- helpers -------------------------------------------------------------------------------------

    def _uri(self, path: str) -> str:
        return path if self._is_local else self.fs.unstrip_protocol(path)

    def _version_path(self, manifest: Manifest) -> str:
        return f"{self._root}/{manifest.lineage}/v{manifest.version}"

    def _parse_uri(self, uri: str) -> tuple[str, int]:
        path = self.fs._strip_protocol(str(uri)).rstrip("/")
        prefix = self._root + "/"
        if not path.startswith(prefix):
            raise ArtifactError(f"{uri!r} is not inside this artifact store ({self.root_uri})")
        parts = path[len(prefix):].split("/")
        if len(parts) != 2 or not VERSION_DIR_RE.fullmatch(parts[1]):
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
            raise ArtifactNotFound(
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
        check_manifest_identity(manifest)
        return PublishedArtifact(self._uri(version_path), manifest)

    def _listing_problems(self, manifest: Manifest, version_path: str) -> dict[str, str]:
        """Relative path -> problem, for files that are missing, extra or of the wrong size."""
        self.fs.invalidate_cache(version_path)
        listing = self.fs.find(version_path, detail=True)
        stored = {path[len(version_path) + 1:]: info["size"] for path, info in listing.items()}
        stored.pop(MANIFEST, None)
        return file_set_problems(manifest, stored)

    def _fetch(self, source: str, destination: Path, relative: str, expected: dict[str, Any]) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with self.fs.open(source, "rb") as reader, open(destination, "wb") as writer:
            while chunk := reader.read(CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
        if digest.hexdigest() != expected["sha256"]:
            raise ArtifactError(
                f"{relative}: sha256 {digest.hexdigest()} but the manifest says {expected['sha256']}"
            )
