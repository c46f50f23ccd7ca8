"""``align export``: an artifact as a Hugging Face model folder (:mod:`align.export`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from align import paths
from align.cli_output import fail, say
from align.cli_service import URL_OPTION, _client, _service_call


def export(
    artifact: Annotated[str, typer.Argument(help="Artifact id (artifact:<id> or <id>) or an artifact's folder.")],
    dest: Annotated[Path, typer.Argument(help="New or empty folder to write the model into.")],
    merge: Annotated[bool, typer.Option(help="Merge an adapter into its base model's weights.")] = False,
    dtype: Annotated[str, typer.Option(help="Merged weights' dtype: auto (the base model's), fp32, bf16, fp16.")]
    = "auto",
    artifact_root: Annotated[
        str | None, typer.Option(help="Artifact store to look the id up in first (default the local one).")
    ] = None,
    url: str | None = URL_OPTION,
) -> None:
    """Write an artifact as a Hugging Face model folder that loads without align: merged safetensors weights
    (--merge) or the peft adapter, the tokenizer with its chat template, and a model card.

    An id is looked up in the local artifact store, else fetched from the service (checked file by file)."""
    from align.artifacts import ARTIFACT_REF_PREFIX, ArtifactError, ArtifactNotFound, ArtifactStore
    from align.export import ExportError, export_artifact
    from align.models.load import ModelError

    root = artifact_root or paths.artifact_root()
    with tempfile.TemporaryDirectory(prefix="align-export-") as scratch:
        if Path(artifact).is_dir():
            source = Path(artifact)
            _check_folder(source)
        else:
            artifact_id = artifact.removeprefix(ARTIFACT_REF_PREFIX)
            try:
                source = ArtifactStore(root).download(ARTIFACT_REF_PREFIX + artifact_id)
            except ArtifactNotFound:
                say(f"{artifact_id} is not in the artifact store {root}; fetching it from the service")
                with _client(url) as client:
                    source = _service_call(lambda: client.download_artifact(artifact_id, Path(scratch) / "artifact"))
            except ArtifactError as error:  # stored, but its files differ from its manifest: refused
                raise fail(str(error)) from None
        try:
            folder = export_artifact(source, dest, merge=merge, dtype=dtype, artifact_root=root)
        except (ExportError, ModelError) as error:
            raise fail(str(error)) from None
    say(f"{artifact} -> {folder}")


def _check_folder(folder: Path) -> None:
    """Refuse an artifact folder whose files differ from its ``manifest.json`` (a folder without one, a
    stage's plain output, is taken as it is)."""
    from align.artifact_manifest import MANIFEST, ArtifactError, Manifest, check_local_copy, check_manifest_identity

    if not (folder / MANIFEST).is_file():
        return
    try:
        manifest = Manifest.from_dict(json.loads((folder / MANIFEST).read_text()))
        check_manifest_identity(manifest)
        check_local_copy(folder, manifest)
    except (ArtifactError, ValueError, TypeError) as error:
        raise fail(f"{folder}: {error}") from None
