"""Pages of the dashboard in Debian's headless Chromium against the API served by uvicorn on SQLite, with no
dispatcher: nothing trains (the job page reads events written straight into the database), so the checks
take seconds. A real job is followed through the pages in tests/e2e/test_dashboard.py."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from services.app import create_app
from services.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "submit-page-key"
SPEC = """name: {name}
base_model: builtin:tiny
stages:
  - type: sft
    data: {{path: "builtin:parity/sft"}}
    max_steps: {steps}
"""


@pytest.fixture(scope="module")
def served(_migrated_sqlite_template, tmp_path_factory):
    """The API's base URL and a sessionmaker on its database."""
    from services.db.session import make_engine, make_sessionmaker

    tmp_path = tmp_path_factory.mktemp("dashboard")
    database = tmp_path / "align.db"
    shutil.copyfile(_migrated_sqlite_template, database)
    settings = Settings(database_url=f"sqlite:///{database}", artifact_root=str(tmp_path / "artifacts"),
                        work_root=str(tmp_path / "work"), bootstrap_api_key=KEY, run_dispatcher=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    engine = make_engine(f"sqlite:///{database}")
    yield f"http://127.0.0.1:{port}", make_sessionmaker(engine)
    server.should_exit = True
    thread.join(10)
    engine.dispose()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: `make chromium` installs Debian's chromium and "
                    "chromium-driver (as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(condition)


def verdict(driver) -> str | None:
    return driver.execute_script("return document.querySelector('#spec-verdict')?.dataset.result ?? null")


def test_submit_sends_the_spec_in_the_editor_and_shows_refused_values_as_text(served, browser):
    import httpx
    from selenium.webdriver.common.keys import Keys

    base_url, _ = served
    browser.get(f"{base_url}/ui/#/submit")
    browser.execute_script("sessionStorage.setItem('align.apiKey', arguments[0]);"
                           "sessionStorage.setItem('align.draftSpec', arguments[1])", KEY,
                           SPEC.format(name="first", steps=2))
    browser.refresh()
    wait(browser, lambda d: verdict(d) == "valid")
    browser.find_element("css selector", "#spec-editor").send_keys(Keys.TAB)  # indents: an edit too
    assert not browser.find_element("css selector", "#submit-job").is_enabled()

    # An edit disables Submit at once: a click before the edited spec is checked must not send the spec
    # checked before the edit.
    disabled = browser.execute_script(
        "const editor = document.querySelector('#spec-editor');"
        "const submit = document.querySelector('#submit-job');"
        "editor.value = arguments[0];"
        "editor.dispatchEvent(new Event('input'));"
        "const disabled = submit.disabled;"
        "submit.click();"
        "return disabled;", SPEC.format(name="second", steps=3))
    assert disabled is True
    wait(browser, lambda d: d.execute_script("return !document.querySelector('#submit-job').disabled"))
    browser.find_element("css selector", "#submit-job").click()
    wait(browser, lambda d: d.execute_script("return location.hash").startswith("#/jobs/job_"))
    jobs = httpx.get(f"{base_url}/jobs", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()["data"]
    assert [(j["name"], j["spec"]["stages"][0]["max_steps"]) for j in jobs if j["name"] != "hand"] == [
        ("second", 3)]

    # A refused value comes back in the 422 message and is shown as text, never parsed as HTML.
    browser.get(f"{base_url}/ui/#/submit")
    browser.execute_script(
        "const editor = document.querySelector('#spec-editor');"
        "editor.value = arguments[0];"
        "editor.dispatchEvent(new Event('input'));", SPEC.format(name="'<img src=x id=injected>'", steps=2))
    wait(browser, lambda d: verdict(d) == "invalid" and "name" in d.find_element("css selector", "#spec-verdict").text)
    assert "<img src=x id=injected>" in browser.find_element("css selector", "#spec-verdict").text
    assert not browser.find_elements("css selector", "#injected")


def test_job_page_draws_what_it_can_shows_reported_text_as_text_and_says_why_a_download_failed(served, browser,
                                                                                                tmp_path):
    """A loss of "nan" (how workers report a non-finite value) is left out of the curve, not drawn as 0 or a
    broken chart; a completion, a retry reason and a gate's reason that look like HTML show as text, the gate
    under its stage; the manifest of an
    artifact the store no longer holds cannot be downloaded, and the page says so."""
    import httpx
    from sqlalchemy import update

    from services.db.artifacts import record_artifact
    from services.db.events import record_event
    from services.db.models import StageRun

    base_url, session_factory = served
    auth = {"Authorization": f"Bearer {KEY}"}
    job = httpx.post(f"{base_url}/jobs", json={"name": "hand", "base_model": "builtin:tiny", "stages": [
        {"type": "sft", "data": {"path": "builtin:parity/sft"}, "max_steps": 3}]}, headers=auth, timeout=120).json()
    run = job["stages"][0]["id"]
    with session_factory.begin() as session:
        # Attempt 1 is the stage's current one, so the job reads its artifact (and gate) as the stage's.
        session.execute(update(StageRun).where(StageRun.id == run).values(attempt=1))
        record_event(session, job["id"], "state", {"from": "queued", "to": "running", "attempt": 1}, run, 1)
        for step, loss in ((1, "nan"), (2, 0.5), (3, 0.25)):
            record_event(session, job["id"], "metrics", {"step": step, "loss": loss}, run, 1)
        record_event(session, job["id"], "samples", {"samples": [
            {"step": 3, "prompt": "<b id=injected>p</b>", "completion": "<img src=x id=injected>", "score": 0.5}]},
            run, 1)
        record_event(session, job["id"], "state", {"from": "running", "to": "retrying", "attempt": 1,
                                                   "error_code": "oom", "error_message": "<i id=injected>x</i>"},
                     run, 1)
        record_artifact(session, job["id"], run, 1, {
            "artifact_id": "art_gone", "lineage": "hand.sft", "version": 1, "uri": str(tmp_path / "gone"),
            "kind": "policy", "manifest_hash": "sha256:" + "0" * 64,
            "gate": {"metric": "loss", "value": 0.25, "baseline": None, "passed": False,
                     "reason": "loss 0.25 > max 0.1 <u id=injected>"}})

    browser.get(f"{base_url}/ui/#/jobs/{job['id']}")
    browser.execute_script("sessionStorage.setItem('align.apiKey', arguments[0])", KEY)
    browser.refresh()
    wait(browser, lambda d: d.execute_script("return document.querySelector('#samples table') !== null"
                                             " && document.querySelector('#stages .reason') !== null"))
    wait(browser, lambda d: d.execute_script(
        "return document.querySelector('figure[data-chart=loss]').dataset.points") == "2")
    assert browser.find_elements("css selector", "figure[data-chart=loss] canvas")
    samples = browser.find_element("css selector", "#samples").text
    assert "<b id=injected>p</b>" in samples and "<img src=x id=injected>" in samples
    assert "oom: <i id=injected>x</i>" in browser.find_element("css selector", "#stages").text
    gate = browser.find_element("css selector", "#stages .gate")
    assert gate.text == "gate failed: loss 0.25 > max 0.1 <u id=injected>"
    assert "state-failed" in gate.get_attribute("class")
    assert "<i id=injected>x</i>" in browser.find_element("css selector", "#event-log").text
    assert not browser.find_elements("css selector", "#injected")

    browser.get(f"{base_url}/ui/#/artifacts/art_gone")
    wait(browser, lambda d: d.find_elements("css selector", "#download-manifest"))[0].click()
    wait(browser, lambda d: "not readable" in d.find_element("css selector", "#download-error").text)

    # A job that does not exist: the page shows the service's 404 once.
    browser.get(f"{base_url}/ui/#/jobs/job_missing")
    wait(browser, lambda d: "no job 'job_missing'" in d.find_element("css selector", "#refresh-error").text)

    # An address with a broken %-escape names no page, and the page says so.
    browser.get(f"{base_url}/ui/#/jobs/%E0%A4%A")
    wait(browser, lambda d: d.find_elements("css selector", "#bad-address"))
