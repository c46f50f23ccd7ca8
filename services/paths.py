"""What a submitted job is checked for before it is accepted: where it may read from, its data, its
base model and the reward models it names.

``check_locations`` refuses data and model locations outside the configured roots and schemes (no
``..``, no ``file:///etc``, no ``http://169.254.169.254``). ``check_data`` then opens each local
dataset and checks it has the columns its stage needs, so a bad file fails the request, not a worker;
``check_model`` checks a local base model's folder and ``check_reward_models`` the reward-model
artifacts a stage names. ``check_job`` runs them all. Each returns a list of ``(field, message)``
pairs; an empty list means the job may run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from align.lineage import reward_model_problem
from align.preflight import job_problems
from align.spec import JobSpec
from services.settings import Settings

Problem = tuple[str, str]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ALWAYS_REFUSED_SCHEMES = ("http", "https")
LOCAL_PREFIXES = ("builtin:", "artifact:")


def check_job(
    spec: JobSpec,
    settings: Settings,
    find_artifact: Callable[[str], object | None],
    base_model_of: Callable[[object], str | None] | None = None,
) -> list[Problem]:
    """Every check a submitted job passes before it is queued, each problem naming its field.

    Locations come first, so nothing outside the roots is ever opened; ``find_artifact`` looks up an
    ``artifact:<id>`` base model or reward model among the caller's artifacts, and ``base_model_of``
    tells the base model a found artifact was trained on.
    """
    problems = check_locations(
        spec, data_roots=settings.data_roots, model_roots=settings.model_roots, allowed_schemes=settings.allowed_schemes
    )
    if problems:
        return problems
    if spec.base_model.startswith("artifact:"):
        artifact_id = spec.base_model.removeprefix("artifact:")
        if find_artifact(artifact_id) is None:
            message = f"no artifact '{artifact_id}'; give the id of an artifact of one of your jobs"
            problems.append(("base_model", message))
        else:
            problems.append(("base_model", ("starting a job from an artifact is not supported yet; give the local "
                                            "model folder (or builtin:tiny) and chain the stages in one job")))
    problems += check_reward_models(spec, find_artifact, base_model_of)
    return problems + job_problems(spec, local_path)


def check_reward_models(
    spec: JobSpec,
    find_artifact: Callable[[str], object | None],
    base_model_of: Callable[[object], str | None] | None = None,
) -> list[Problem]:
    """Each stage's ``reward_model: artifact:<id>`` must be one of the caller's reward-model artifacts,
    trained on the job's base model (:func:`align.lineage.reward_model_problem`)."""
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
            problem = reward_model_problem(artifact_id, artifact.kind, trained_on, spec.base_model)
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
) -> list[Problem]:
    """Every data path and local base model must lie under its roots and use an allowed scheme."""
    problems = []
    for field, kind, location in spec_locations(spec):
        roots = data_roots if kind == "data" else model_roots
        setting = "ALIGN_DATA_ROOTS" if kind == "data" else "ALIGN_MODEL_ROOTS"
        message = location_problem(location, roots, allowed_schemes, allow_artifact=kind == "model", setting=setting)
        if message is not None:
            problems.append((field, message))
    return problems


def location_problem(
    location: str,
    roots: Sequence[str | Path],
    allowed_schemes: Sequence[str],
    *,
    allow_artifact: bool = False,
    setting: str = "ALIGN_DATA_ROOTS",
) -> str | None:
    """Why ``location`` may not be read, or None when it may; a refusal by the roots names ``setting``,
    the service setting that lists them."""
    if "\0" in location:
        return "contains a NUL character"
    if location.startswith("builtin:") or (allow_artifact and location.startswith("artifact:")):
        return None
    match = _SCHEME_RE.match(location)
    scheme = match.group(1).lower() if match else "file"
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
        return None
    if not os.path.isabs(path):
        return (
            f"'{location}' is not an absolute path; the service and its workers do not share your working "
            "folder, so give the full path (align submit makes paths in a spec file absolute)"
        )
    resolved = Path(os.path.realpath(path))
    for root in roots:
        if resolved.is_relative_to(os.path.realpath(root)):
            return None
    return (f"'{location}' is outside the allowed folders {_roots(roots)}; move it under one of them, or add "
            f"its folder to the service's {setting} (a JSON list of folders) and restart it")


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
