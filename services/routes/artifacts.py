"""Artifacts: the database row with the stored manifest, and the artifact's files."""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator

from fastapi import APIRouter, HTTPException, Request, Security, status
from fastapi.responses import StreamingResponse

from align.artifacts import MANIFEST, ArtifactError, ArtifactStore, PublishedArtifact
from services.db import artifacts
from services.deps import SessionDep, TenantDep
from services.routes.openapi import API_KEY, NOT_FOUND, PROTECTED
from services.schemas import ArtifactPublic

router = APIRouter(prefix="/artifacts", tags=["artifacts"], dependencies=[Security(API_KEY)],
                   responses={**PROTECTED, **NOT_FOUND})

CHUNK_BYTES = 1 << 20


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
def get_artifact(artifact_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> ArtifactPublic:
    """The artifact's row and its manifest (null when the store no longer holds it)."""
    row = _owned_artifact(session, tenant.id, artifact_id)
    try:
        manifest = _store(request).get(row.uri).manifest.to_dict()
    except ArtifactError:
        manifest = None
    return ArtifactPublic.model_validate(row).model_copy(update={"manifest": manifest})


@router.get("/{artifact_id}/files/{path:path}", response_class=StreamingResponse)
def get_artifact_file(
    artifact_id: str, path: str, request: Request, session: SessionDep, tenant: TenantDep
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
