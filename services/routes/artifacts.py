"""Artifacts: the database row with the stored manifest, the artifact's files, and its merged export."""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Security, status
from fastapi import Path as PathParameter
from fastapi.responses import FileResponse, StreamingResponse

from align.artifacts import MANIFEST, ArtifactError, ArtifactStore, PublishedArtifact
from services.db import artifacts
from services.deps import FieldErrors, SessionDep, SettingsDep, TenantDep, refuse_unknown_query
from services.routes.openapi import API_KEY, NOT_FOUND, PROTECTED
from services.schemas import ArtifactPublic

router = APIRouter(prefix="/artifacts", tags=["artifacts"],
                   dependencies=[Security(API_KEY), Depends(refuse_unknown_query)],
                   responses={**PROTECTED, **NOT_FOUND})

CHUNK_BYTES = 1 << 20
ArtifactId = Annotated[str, PathParameter(min_length=1, description="An artifact id, as a job's stage names it")]


def _store(request: Request) -> ArtifactStore:
    store = getattr(request.app.state, "artifact_store", None)
    if store is None:
        store = request.app.state.artifact_store = ArtifactStore(request.app.state.settings.artifact_root)
    return store


def _owned_artifact(session, tenant_id: str, artifact_id: str):
    row = artifacts.get_artifact(session, tenant_id, artifact_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {artifact_id!r}")
    return row


def _published(store: ArtifactStore, row) -> PublishedArtifact:
    try:
        return store.get(row.uri)
    except ArtifactError as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"artifact {row.id!r} is not readable: {error}") from None


@router.get("/{artifact_id}", response_model=ArtifactPublic)
def get_artifact(artifact_id: ArtifactId, request: Request, session: SessionDep, tenant: TenantDep) -> ArtifactPublic:
    """The artifact's row and its manifest (null when the store no longer holds it)."""
    row = _owned_artifact(session, tenant.id, artifact_id)
    try:
        manifest = _store(request).get(row.uri).manifest.to_dict()
    except ArtifactError:
        manifest = None
    return ArtifactPublic.model_validate(row).model_copy(update={"manifest": manifest})


@router.get("/{artifact_id}/files/{path:path}", response_class=StreamingResponse)
def get_artifact_file(
    artifact_id: ArtifactId,
    path: Annotated[str, PathParameter(min_length=1, description="A file the manifest lists")],
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
) -> StreamingResponse:
    """Stream one file of the artifact; only paths in its manifest (and manifest.json itself) are served."""
    row = _owned_artifact(session, tenant.id, artifact_id)
    store = _store(request)
    artifact = _published(store, row)
    if path != MANIFEST and path not in artifact.manifest.files:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"artifact {artifact_id!r} has no file {path!r}")
    location = f"{artifact.uri.rstrip('/')}/{path}"
    headers = {}
    if path in artifact.manifest.files:
        headers["Content-Length"] = str(artifact.manifest.files[path]["size"])
        headers["ETag"] = f'"{artifact.manifest.files[path]["sha256"]}"'
    media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return StreamingResponse(_read_chunks(store, location), media_type=media_type, headers=headers)


def _read_chunks(store: ArtifactStore, location: str) -> Iterator[bytes]:
    with store.fs.open(location, "rb") as reader:
        while chunk := reader.read(CHUNK_BYTES):
            yield chunk


@router.get("/{artifact_id}/export", response_class=FileResponse,
            responses={200: {"content": {"application/x-tar": {}},
                             "description": "The merged Hugging Face model folder as a tar archive"}})
def export_artifact(
    artifact_id: ArtifactId, request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> FileResponse:
    """The policy as a Hugging Face model folder (``align export --merge``): merged safetensors weights, the
    tokenizer with its chat template and the model card, as ``<artifact_id>.tar``. Built on the first
    request (it loads the base model) and kept under ``<work_root>/exports``."""
    row = _owned_artifact(session, tenant.id, artifact_id)
    # Imported once the artifact is known to be the caller's: align.export imports torch and transformers,
    # seconds the first time, which a 404 should not wait for.
    from align.export import ExportError, archive_path, export_archive
    from align.models.load import ModelError

    # End the look-up's transaction before the build, which loads and merges a model: a held transaction
    # keeps a connection, and on SQLite the write lock every other writer waits on.
    session.commit()
    cache = Path(settings.work_root) / "exports"
    archive = archive_path(cache, row.id)
    if not archive.is_file():
        store = _store(request)
        artifact = _published(store, row)
        cache.mkdir(parents=True, exist_ok=True)
        try:
            archive = export_archive(store.download(artifact.uri), cache, row.id, settings.artifact_root)
        except (ArtifactError, ExportError, ModelError) as error:
            raise FieldErrors([("artifact_id", str(error))]) from None
    return FileResponse(archive, media_type="application/x-tar", filename=f"{row.id}.tar")
