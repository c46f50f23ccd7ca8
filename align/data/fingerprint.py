"""Content fingerprints of dataset files, so a run records exactly which data it trained on."""

import hashlib
import os

CHUNK_BYTES = 1 << 20


def _update_with_file(digest: "hashlib._Hash", path: str) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)


def file_fingerprint(path: str) -> str:
    """``"sha256:<hex>"`` of a file's bytes, or of every file in a folder, read in 1 MiB chunks.

    For a folder, each file contributes its path relative to the folder (``/``-separated, in sorted
    order) and its size before its bytes, so renaming a file or moving bytes between files changes the
    fingerprint too.
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or folder")
    digest = hashlib.sha256()
    if not os.path.isdir(path):
        _update_with_file(digest, path)
        return f"sha256:{digest.hexdigest()}"
    relative_paths = []
    for folder, _, names in os.walk(path):
        for name in names:
            relative_paths.append(os.path.relpath(os.path.join(folder, name), path).replace(os.sep, "/"))
    for relative_path in sorted(relative_paths):
        full_path = os.path.join(path, relative_path)
        encoded_path = relative_path.encode("utf-8")
        digest.update(len(encoded_path).to_bytes(8, "big") + encoded_path)
        digest.update(os.path.getsize(full_path).to_bytes(8, "big"))
        _update_with_file(digest, full_path)
    return f"sha256:{digest.hexdigest()}"
