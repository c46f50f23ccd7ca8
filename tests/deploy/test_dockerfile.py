"""deploy/Dockerfile, read as Docker would (no daemon here): what it copies exists and is in its build context,
the extras it installs exist, its commands are real `align` commands, and its base is the Ray image the
project pins."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import version

import pytest
import tomllib
from deploy_files import DEPLOY, REPO, dockerfile_instructions, expand, resolve_align_command
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
INSTRUCTIONS = dockerfile_instructions(DEPLOY / "Dockerfile")
ARGS = {}
for _instruction in INSTRUCTIONS:
    if _instruction.keyword == "ARG" and "=" in _instruction.arguments:
        _name, _, _default = _instruction.arguments.partition("=")
        ARGS.setdefault(_name, _default)


def instructions(keyword: str):
    return [i for i in INSTRUCTIONS if i.keyword == keyword]


def requirement(name: str, extra: str | None = None) -> Requirement:
    project = PYPROJECT["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return next(r for r in map(Requirement, specs) if r.name == name)


def test_every_copied_file_exists_and_is_in_the_build_context():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the context is the repository root: everything not named is left out"
    sources = []
    for copy in instructions("COPY"):
        words = copy.words()
        if any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words[:-1] if not w.startswith("--")]
    assert {"pyproject.toml", "align", "services", "workers", "migrations"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        assert source in included, f"COPY {source}: left out of the build context by Dockerfile.dockerignore"


def test_installed_extras_exist_and_cover_every_role():
    installs = [expand(r.arguments, ARGS) for r in instructions("RUN") if "pip install" in r.arguments]
    extras = [e for text in installs for group in re.findall(r"align-\*\.whl\)\[([\w,-]+)\]", text)
              for e in group.split(",")]
    assert set(extras) == {"api", "worker"}, "API, dispatcher and migrations need [api]; Ray workers [worker]"
    for extra in extras:
        assert extra in PYPROJECT["project"]["optional-dependencies"], f"extra [{extra}] is not in pyproject.toml"


def test_torch_stays_pinned():
    torch = requirement("torch")
    assert str(torch.specifier).startswith("=="), "pyproject pins torch to one version"
    for run in instructions("RUN"):
        for part in run.arguments.split("&&"):
            if "pip install" not in part:
                continue
            named = [w for w in shlex.split(part) if re.match(r"torch\b", w)]
            assert not named, f"line {run.line}: the image installs torch only as align requires it, not {named}"


def test_base_is_the_ray_image_of_the_pinned_ray():
    ray_version = ARGS["RAY_VERSION"]
    assert ray_version == version("ray"), "the image runs the Ray the tests run"
    assert requirement("ray", "worker").specifier.contains(ray_version)
    froms = [expand(i.arguments, ARGS).split()[0] for i in instructions("FROM")]
    assert froms and all(f == f"rayproject/ray:{ray_version}-py311" for f in froms)
    assert re.fullmatch(r"py311(-cu12\d)?", ARGS["RAY_IMAGE_SUFFIX"])
    assert len(instructions("FROM")) >= 2, "multi-stage: the wheel is built in a stage of its own"
    pinned = [r.arguments for r in instructions("RUN") if '"ray[default,train]==${RAY_VERSION}"' in r.arguments]
    assert pinned, "pip keeps the base image's Ray"


def test_runs_as_a_user_and_checks_its_health():
    final_stage = INSTRUCTIONS[max(i for i, x in enumerate(INSTRUCTIONS) if x.keyword == "FROM"):]
    users = [i.arguments for i in final_stage if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    (healthcheck,) = instructions("HEALTHCHECK")
    assert " CMD " in f" {healthcheck.arguments} "
    from services.routes.health import router

    path = re.search(r"/(\w+)' %|/(\w+)\b'", healthcheck.arguments)
    assert path and f"/{path.group(1) or path.group(2)}" in {route.path for route in router.routes}


@pytest.mark.parametrize("keyword", ["CMD", "ENTRYPOINT"])
def test_commands_are_real_align_subcommands(keyword):
    found = instructions(keyword)
    if keyword == "ENTRYPOINT":
        assert not found, "no entrypoint: compose and KubeRay give each role its command"
        return
    words = found[-1].words()
    assert words[0] == "align"
    assert resolve_align_command(words[1:]) == ["serve"]


def test_a_wrong_command_would_be_caught():
    for wrong in (["serve", "--no-such-flag"], ["migrate"], ["db", "upgrade", "head", "extra"]):
        with pytest.raises(Exception, match="(?i)no such|unexpected extra|got unexpected"):
            resolve_align_command(wrong)
