"""The dashboard's server side: POST /jobs/validate answers exactly as POST /jobs would, and /ui serves the
pages, their modules and the vendored libraries, all of which the wheel ships; `make chromium` explains what
to install where it cannot install the browser."""

from __future__ import annotations

import glob
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from align.spec import JobSpec
from services.app import UI_FOLDER, create_app
from services.settings import Settings

REPO = Path(__file__).resolve().parent.parent.parent
KEY = {"Authorization": "Bearer ui-key"}


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    sft = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(4)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (root / "no-rejected.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    return root


@pytest.fixture
def database_url(_migrated_sqlite_template, tmp_path) -> str:
    """SQLite only: these routes read no more of the database than POST /jobs, which test_api runs on both."""
    path = tmp_path / "align.db"
    shutil.copyfile(_migrated_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def client(tmp_path, database_url, session_factory, data_dir):
    settings = Settings(database_url=database_url, artifact_root=str(tmp_path / "artifacts"),
                        work_root=str(tmp_path / "work"), data_roots=[str(data_dir)],
                        model_roots=[str(tmp_path / "models")], bootstrap_api_key="ui-key", run_dispatcher=False)
    with TestClient(create_app(settings, session_factory=session_factory)) as test_client:
        yield test_client


def spec(data_dir: Path, **stage) -> dict:
    return {"name": "ui", "base_model": "builtin:tiny",
            "stages": [{"type": "sft", "data": {"path": str(data_dir / "sft.jsonl")}, "max_steps": 2, **stage}]}


def test_validate_accepts_a_good_spec_with_the_defaults_post_jobs_would_store_and_queues_nothing(client, data_dir):
    # An Idempotency-Key sent along is not recorded: the same key queues the job afterwards (201, not a replay).
    checked = client.post("/jobs/validate", json=spec(data_dir), headers={**KEY, "Idempotency-Key": "k1"})
    assert checked.status_code == 200, checked.text
    stage = checked.json()["spec"]["stages"][0]
    defaults = JobSpec.model_validate(spec(data_dir)).stages[0]
    assert stage["max_steps"] == 2 and (stage["batch_size"], stage["lr"]) == (defaults.batch_size, defaults.lr)
    assert client.get("/jobs", headers=KEY).json()["data"] == []
    answer = client.post("/jobs", json=spec(data_dir), headers={**KEY, "Idempotency-Key": "k1"})
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert (created["spec"], created["spec_hash"]) == (checked.json()["spec"], checked.json()["spec_hash"])
    assert created["tenant"] == "default"


@pytest.mark.parametrize("bad", [
    {"bogus": 1},                                                   # the spec model
    {"data": {"path": "/etc/passwd"}},                              # a location outside the data roots
    {"type": "dpo", "data": {"path": "{data}/no-rejected.jsonl"}},  # data without the stage's columns
    {"type": "ppo", "data": {"path": "{data}/sft.jsonl"}, "reward_model": "artifact:art_missing"},
])
def test_validate_refuses_with_the_same_422_as_post_jobs(client, data_dir, bad):
    body = json.loads(json.dumps(spec(data_dir, **bad)).replace("{data}", str(data_dir)))
    checked = client.post("/jobs/validate", json=body, headers=KEY)
    submitted = client.post("/jobs", json=body, headers=KEY)
    assert checked.status_code == submitted.status_code == 422
    assert checked.json() == submitted.json() and checked.json()["detail"]


def test_validate_needs_a_key_and_is_in_the_openapi_document(client, data_dir):
    assert client.post("/jobs/validate", json=spec(data_dir)).status_code == 401
    operation = client.get("/openapi.json").json()["paths"]["/jobs/validate"]["post"]
    assert set(operation["responses"]) >= {"200", "401", "422"}
    assert operation["requestBody"]["content"]["application/json"]["schema"]["properties"]["stages"]


def test_ui_serves_its_pages_modules_and_vendored_libraries(client):
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in page.text
    modules = sorted(UI_FOLDER.glob("*.js"))
    assert {m.name for m in modules} >= {"app.js", "api.js", "jobs.js", "job.js", "artifact.js", "submit.js"}
    for module in modules:
        for target in re.findall(r'^import .* from "\./([^"]+)";$', module.read_text(), re.M):
            answer = client.get(f"/ui/{target}")
            assert answer.status_code == 200, f"{module.name} imports {target}"
            assert answer.headers["content-type"].startswith("text/javascript"), target
    assert client.get("/ui/vendor/uplot/uPlot.min.css").headers["content-type"].startswith("text/css")
    # Browsers check each file again on load, so an upgrade never mixes old and new modules; unchanged is a 304.
    module = client.get("/ui/app.js")
    assert module.headers["cache-control"] == "no-cache" and page.headers["cache-control"] == "no-cache"
    assert client.get("/ui/app.js", headers={"If-None-Match": module.headers["etag"]}).status_code == 304
    readme = (UI_FOLDER / "vendor" / "README.md").read_text()
    for vendored in (UI_FOLDER / "vendor").iterdir():
        if vendored.is_dir():
            assert (vendored / "LICENSE").is_file() and f"`{vendored.name}/`" in readme


def test_the_wheel_ships_every_dashboard_file():
    """Every file under services/ui matches a package-data pattern of pyproject.toml."""
    package_data = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    patterns = json.loads(re.search(r"^services = (\[.*?\])", package_data, re.M).group(1))
    shipped = {path for pattern in patterns for path in glob.glob(pattern, root_dir=UI_FOLDER.parent)}
    files = {p.relative_to(UI_FOLDER.parent).as_posix() for p in UI_FOLDER.rglob("*") if p.is_file()}
    assert files and not files - shipped, files - shipped


@pytest.mark.parametrize("uid", [None, 1000])
def test_make_chromium_says_what_to_install_without_apt_get_or_root(tmp_path, uid):
    """With the browser missing, `make chromium` ends with one clear line, and never runs apt-get as a user."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if uid is None:  # no apt-get on PATH
        (bin_dir / "id").symlink_to(shutil.which("id"))
    else:  # apt-get is there, but the user is not root
        (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
        (bin_dir / "apt-get").write_text(f"#!/bin/sh\ntouch {tmp_path}/apt-get-ran\nexit 100\n")
        for tool in ("id", "apt-get"):
            (bin_dir / tool).chmod(0o755)
    missing = tmp_path / "chromium"
    run = subprocess.run([shutil.which("make"), "-s", "-C", str(REPO), "chromium", f"CHROMIUM={missing}"],
                         env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode != 0 and not (tmp_path / "apt-get-ran").exists()
    assert f"make chromium: {missing} or /usr/bin/chromedriver is missing" in run.stderr
    advice = "there is no apt-get here" if uid is None else "sudo apt-get install -y chromium chromium-driver"
    assert advice in run.stderr


def test_the_jobs_list_the_dashboard_polls_reads_a_fixed_number_of_statements(client, data_dir, session_factory):
    """GET /jobs (every 5 s from each open jobs page) reads the stages' artifacts in one statement, not one
    per stage run."""
    from sqlalchemy import event, update

    from services.db.models import StageRun

    def statements() -> int:
        with session_factory.begin() as session:  # every stage has run once, so each may have an artifact
            session.execute(update(StageRun).values(attempt=1))
        seen = []
        listener = lambda *args: seen.append(args[2])  # noqa: E731
        event.listen(session_factory.kw["bind"], "before_cursor_execute", listener)
        try:
            assert client.get("/jobs?limit=50", headers=KEY).status_code == 200
        finally:
            event.remove(session_factory.kw["bind"], "before_cursor_execute", listener)
        return len(seen)

    two_stages = spec(data_dir)
    two_stages["stages"].append({**two_stages["stages"][0], "name": "again"})
    assert client.post("/jobs", json=two_stages, headers=KEY).status_code == 201
    one_job = statements()
    for _ in range(3):
        assert client.post("/jobs", json=two_stages, headers=KEY).status_code == 201
    assert statements() == one_job
