"""The folders a tenant's job may read (``ALIGN_DATA_ROOTS``, ``ALIGN_MODEL_ROOTS``) and the ones it never may
(``ALIGN_ARTIFACT_ROOT``, ``ALIGN_WORK_ROOT``: every tenant's artifacts and checkpoints).

A root may name its tenant: ``/srv/data/{tenant}`` is ``/srv/data/alice`` for tenant ``alice`` and
``/srv/data/bob`` for ``bob`` (``{tenant_id}``: the tenant's id), so two tenants on one service cannot name
each other's files. :func:`overlap_problems` refuses settings under which a job could read the artifact
or work root, or one tenant another's folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

PLACEHOLDERS = ("{tenant}", "{tenant_id}")
SAFE_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
"""A tenant name that ``{tenant}`` turns into a folder: no ``/``, no leading dot, nothing odd."""
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class TenantLike(Protocol):
    id: str
    name: str


def tenant_roots(roots: Sequence[str], tenant: TenantLike | None) -> list[str]:
    """``roots`` as ``tenant`` sees them: ``{tenant}`` replaced by its name, ``{tenant_id}`` by its id.

    A root that names its tenant is left out when there is none, or when the tenant's name is no safe
    folder name (:data:`SAFE_FOLDER_NAME`): such a tenant reads through ``{tenant_id}`` roots only."""
    expanded = []
    for root in roots:
        if not is_template(root):
            expanded.append(root)
            continue
        if tenant is None or ("{tenant}" in root and not SAFE_FOLDER_NAME.fullmatch(tenant.name)):
            continue
        expanded.append(root.replace("{tenant_id}", tenant.id).replace("{tenant}", tenant.name))
    return expanded


def is_template(root: str) -> bool:
    return any(placeholder in root for placeholder in PLACEHOLDERS)


def fixed_part(root: str) -> str:
    """The folder above a root's first placeholder (``/srv/data`` of ``/srv/data/{tenant}/in``): every tenant's
    folder lies in it."""
    parts = Path(root).parts
    for index, part in enumerate(parts):
        if is_template(part):
            return str(Path(*parts[:index])) if index else "."
    return root


def local_folder(location: str) -> str | None:
    """The local folder a root or store location names (``file://`` stripped), or None for another scheme."""
    match = _SCHEME_RE.match(location)
    if match is None:
        return location
    return location[match.end():] if match.group(1).lower() == "file" else None


def resolved(path: str) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def overlap(a: Path, b: Path) -> bool:
    """Whether one folder is the other or lies inside it."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def overlap_problems(
    artifact_root: str, work_root: str, data_roots: Sequence[str], model_roots: Sequence[str]
) -> list[str]:
    """Why these settings would let a job read what it must not, one line per pair of settings at fault:

    - the artifact or work root is, holds or lies inside a data or model root (a tenant-named root counts
      from its :func:`fixed_part`, since a tenant may be named like any folder);
    - a root shared by every tenant is, holds or lies inside the folder of a tenant-named one."""
    readable = [("ALIGN_DATA_ROOTS", root) for root in data_roots] + [("ALIGN_MODEL_ROOTS", r) for r in model_roots]
    problems = []
    for store_setting, store in (("ALIGN_ARTIFACT_ROOT", artifact_root), ("ALIGN_WORK_ROOT", work_root)):
        folder = local_folder(store)
        if folder is None:
            continue
        for setting, root in readable:
            if overlap(resolved(folder), resolved(fixed_part(root))):
                problems.append(
                    f"{store_setting} ({store}) and the {setting} entry {root!r} overlap: a job could read every "
                    f"tenant's {'artifacts' if store_setting == 'ALIGN_ARTIFACT_ROOT' else 'checkpoints'}; keep "
                    f"{store_setting} outside every data and model root")
    shared = [(setting, root) for setting, root in readable if not is_template(root)]
    for template_setting, template in [(setting, root) for setting, root in readable if is_template(root)]:
        for setting, root in shared:
            if overlap(resolved(root), resolved(fixed_part(template))):
                problems.append(
                    f"the {setting} entry {root!r} overlaps the tenants' folders of the {template_setting} entry "
                    f"{template!r}: every tenant could read the others' files through it; move the shared "
                    "folder elsewhere")
    return problems
