"""What a submitted job is checked for before it is accepted: where it may read from, its data, its
base model and the reward models it names.

``check_locations`` refuses data and model locations outside the caller's roots (:mod:`services.roots`) and
the allowed schemes (no ``..``, no ``file:///etc``, no ``http://169.254.169.254``); what lies outside the
roots, in the artifact or work root, or nowhere gets one answer. ``check_data`` then opens each local
dataset and checks it has the columns its stage needs, so a bad file fails the request, not a worker;
``check_model`` checks a local base model's folder, ``check_reward_models`` the reward-model
artifacts a stage names, and a ``base_model: artifact:<id>`` must be one of the caller's policies
(:func:`align.lineage.start_artifact_check`) whose weight files are safetensors
(:func:`align.models.weights.artifact_weights_problem`). ``check_job`` runs them all. Each returns a list
of ``(field, message)`` pairs; an empty list means the job may run.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from align.lineage import reward_model_problem, root_base_model, start_artifact_check
from align.models.weights import artifact_weights_problem
from align.preflight import job_problems
from align.spec import JobSpec
from align.tracking import tracking_problems
from services.capacity import capacity_problems
from services.roots import TenantLike, local_folder, resolved, tenant_roots
from services.settings import Settings

Problem = tuple[str, str]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ALWAYS_REFUSED_SCHEMES = ("http", "https")
LOCAL_PREFIXES = ("builtin:", "artifact:")
ROOTS_SETTING = {"data": "ALIGN_DATA_ROOTS", "model": "ALIGN_MODEL_ROOTS"}


def check_job(
    spec: JobSpec,
    settings: Settings,
    find_artifact: Callable[[str], object | None],
    base_model_of: Callable[[object], str | None] | None = None,
    tenant: TenantLike | None = None,
) -> list[Problem]:
    """Every check a submitted job passes before it is queued, each problem naming its field.

    Locations come first, and a refused one is never opened; ``find_artifact`` looks up an
    ``artifact:<id>`` base model or reward model among the caller's artifacts, and ``base_model_of``
    tells the base model a found artifact was trained on. ``tenant`` is the caller: roots that name
    ``{tenant}`` are its own folders, and without it those roots hold nothing. A job that passes all of
    these is planned last (:mod:`services.capacity`): a stage that cannot fit its workers' memory is refused.
    """
    problems = check_locations(
        spec,
        data_roots=tenant_roots(settings.data_roots, tenant),
        model_roots=tenant_roots(settings.model_roots, tenant),
        allowed_schemes=settings.allowed_schemes,
        hidden=[settings.artifact_root, settings.work_root],
    )
    refused = {location for field, kind, location in spec_locations(spec) if field in dict(problems)}
    problems += tracking_problems(spec, settings.mlflow_tracking_uri)
    # The data first: reading it takes seconds, and a look-up begins a transaction (on SQLite, the write lock).
    data_problems = job_problems(spec, lambda location: None if location in refused else local_path(location))
    start_problem = start_artifact_check(spec, find_artifact)
    if start_problem is None and spec.base_model.startswith("artifact:"):
        weights = artifact_weights_problem(settings.artifact_root, spec.base_model)
        start_problem = weights and f"'{spec.base_model}' {weights}"
    if start_problem is not None:
        problems.append(("base_model", start_problem))
    problems += check_reward_models(spec, find_artifact, base_model_of)
    if not problems and not data_problems:
        root = root_base_model(spec.base_model, find_artifact, base_model_of or (lambda artifact: None))
        problems += capacity_problems(spec, settings, local_path(root) or root)
    return problems + data_problems


def check_reward_models(
    spec: JobSpec,
    find_artifact: Callable[[str], object | None],
    base_model_of: Callable[[object], str | None] | None = None,
) -> list[Problem]:
    """Each stage's ``reward_model: artifact:<id>`` must be one of the caller's reward-model artifacts,
    trained on the job's base model (:func:`align.lineage.reward_model_problem`; both followed through
    ``artifact:<id>`` base models, :func:`align.lineage.root_base_model`)."""
    def root(base_model: str) -> str:
        return root_base_model(base_model, find_artifact, base_model_of or (lambda artifact: None))

    problems = []
    for index, stage in enumerate(spec.stages):
        reference = getattr(stage, "reward_model", None)
        if reference is None:
            continue
        field = f"stages[{index}].reward_model"
        earlier_rm = any(s.type == "rm" for s in spec.stages[:index])
        fallback = " or drop reward_model to score with the rm stage before this one" if earlier_rm else ""
        artifact_id = reference.removeprefix("artifact:")
        artifact = find_artifact(artifact_id)
        if artifact is None:
            problem = (f"no artifact '{artifact_id}'; give artifact:<id> of a reward model that an rm stage "
                       "of one of your jobs published")
        else:
            trained_on = base_model_of(artifact) if base_model_of is not None else None
            problem = reward_model_problem(artifact_id, artifact.kind, trained_on and root(trained_on),
                                           root(spec.base_model))
        if problem is not None:
            problems.append((field, problem + fallback))
    return problems


def spec_locations(spec: JobSpec) -> Iterator[tuple[str, str, str]]:
    """``(field, kind, location)`` for the base model and every stage's data files; kind is model or data."""
    yield "base_model", "model", spec.base_model
    for index, stage in enumerate(spec.stages):
        yield f"stages[{index}].data.path", "data", stage.data.path
        if stage.data.eval_path is not None:
            yield f"stages[{index}].data.eval_path", "data", stage.data.eval_path


def check_locations(
    spec: JobSpec,
    *,
    data_roots: Sequence[str | Path],
    model_roots: Sequence[str | Path],
    allowed_schemes: Sequence[str],
    hidden: Sequence[str] = (),
) -> list[Problem]:
    """Every data path and local base model must lie under its roots (the caller's, with ``{tenant}``
    expanded: :func:`services.roots.tenant_roots`), exist, and use an allowed scheme; nothing under
    ``hidden`` (the artifact and work roots) is ever named."""
    problems = []
    for field, kind, location in spec_locations(spec):
        roots = data_roots if kind == "data" else model_roots
        message = location_problem(location, roots, allowed_schemes, allow_artifact=kind == "model", kind=kind,
                                   hidden=hidden)
        if message is not None:
            problems.append((field, message))
    return problems


def location_problem(
    location: str,
    roots: Sequence[str | Path],
    allowed_schemes: Sequence[str],
    *,
    allow_artifact: bool = False,
    kind: str = "data",
    hidden: Sequence[str] = (),
) -> str | None:
    """Why ``location`` may not be read, or None when it may.

    A local path that resolves (``..``, symlinks) outside ``roots`` or into ``hidden``, or names nothing,
    gets one answer, :func:`not_found`, so that it tells nobody what lies outside their folders."""
    if "\0" in location:
        return "contains a NUL character"
    if location.startswith("builtin:") or (allow_artifact and location.startswith("artifact:")):
        return None
    match = _SCHEME_RE.match(location)
    scheme = match.group(1).lower() if match else "file"
    setting = ROOTS_SETTING[kind]
    if scheme in _ALWAYS_REFUSED_SCHEMES:
        return (f"'{location}' is a web address; {scheme}:// locations are never read, give a path under "
                f"{_roots(roots)} (the service's {setting})")
    if scheme not in [s.lower() for s in allowed_schemes]:
        allowed = ", ".join(f"{s}://" for s in allowed_schemes) or "none"
        return f"scheme '{scheme}://' is not allowed (allowed: {allowed}; the service's ALIGN_ALLOWED_SCHEMES)"
    path = location[match.end():] if match else location
    if ".." in PurePosixPath(path).parts:
        return f"'{location}' contains '..'; give a path without parent-directory steps"
    if scheme != "file":
        return not_found(location, roots, kind) if remote_problem(location, hidden) else None
    if not os.path.isabs(path):
        return (
            f"'{location}' is not an absolute path; the service and its workers do not share your working "
            "folder, so give the full path (align submit makes paths in a spec file absolute)"
        )
    target = resolved(path)
    inside = any(target.is_relative_to(resolved(str(root))) for root in roots)
    hidden_folders = [resolved(folder) for folder in map(local_folder, hidden) if folder is not None]
    if (not inside or any(target.is_relative_to(folder) for folder in hidden_folders)
            or not (target.is_file() or target.is_dir())):  # a FIFO or device would hang the reader
        return not_found(location, roots, kind)
    return None


def not_found(location: str, roots: Sequence[str | Path], kind: str) -> str:
    """The one answer to a location that names nothing the caller may read, whether or not it exists."""
    what = "file or folder" if kind == "data" else "model folder"
    return (f"'{location}': no such {what} in your {kind} folders {_roots(roots)}; give the full path of one "
            f"under them (the service's {ROOTS_SETTING[kind]})")


def remote_problem(location: str, hidden: Sequence[str]) -> bool:
    """Whether a location with an allowed remote scheme (``s3://...``) must not be read: it lies in the
    artifact or work store, chains filesystems (fsspec's ``::``), or names a host by address or a metadata
    service rather than a bucket."""
    if "::" in location or any(_within_url(location, store) for store in hidden):
        return True
    host = (urlsplit(location).hostname or "").strip("[]")
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host in ("localhost", "metadata", "metadata.google.internal") or host.endswith(".internal")


def _within_url(location: str, store: str) -> bool:
    store = store.rstrip("/")
    return _SCHEME_RE.match(store) is not None and (location == store or location.startswith(store + "/"))


def _roots(roots: Sequence[str | Path]) -> str:
    return "[" + ", ".join(str(r) for r in roots) + "]"


def local_path(location: str) -> str | None:
    """The local file a location names, or None for built-in, artifact and remote locations."""
    if location.startswith(LOCAL_PREFIXES):
        return None
    match = _SCHEME_RE.match(location)
    if match is None:
        return location
    return location[match.end():] if match.group(1).lower() == "file" else None


def check_data(spec: JobSpec) -> list[Problem]:
    """Open each stage's local data and check its rows fit the stage; built-in names must exist.

    Nothing is downloaded: remote locations (allowed schemes other than file) are left to the worker.
    When the base model's tokenizer loads from its files alone, a sample of each dataset's conversational
    rows is rendered with its chat template, and a template that cannot mark the assistant's tokens is
    refused on ``base_model`` with the rendered row (``align.preflight.job_problems``).
    """
    return job_problems(spec, local_path, model=False)


def check_model(spec: JobSpec) -> list[Problem]:
    """A local base model must be a Hugging Face folder with safetensors weights (nothing is loaded)."""
    return job_problems(spec, local_path, data=False)
