"""The dashboard at /ui in Debian's headless Chromium (Selenium + chromium-driver) against `align serve`.

One SFT -> DPO job runs through the whole service (HTTP -> Postgres -> dispatcher -> Ray -> DeepSpeed ->
artifacts) while its page follows it over the event stream; the same run checks the service's own answers.
Screenshots go to .align/test-outputs/ui/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_service import dpo, job_spec, sft

from align.client import ServiceError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent.parent
OUTPUT = REPO / ".align" / "test-outputs" / "ui"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
LOSS_POINTS = 7  # at least the 4 SFT and 3 DPO training losses


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when either is missing (never a downloaded browser)."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: as root, `apt-get install -y chromium chromium-driver`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def browser():
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> Path:
    """The whole page, not only the window: the window is stretched to the page's height first."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1440, max(900, min(height + 120, 6000)))
    path = OUTPUT / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1440, 1000)
    print(f"screenshot: {path}")
    return path


def wait(driver, condition, seconds: float = 30):
    """Poll ``condition(driver)`` until it is truthy; the pages re-render as events arrive, so an element
    read between two renders may be gone (stale): that read counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.25, ignored_exceptions=[StaleElementReferenceException]
                         ).until(condition)


def find(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def read(driver, selector: str, attribute: str | None = None):
    """An element's attribute (or its text), read in one script call so a re-render cannot intervene."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); if (!e) return null;"
        "return arguments[1] ? e.getAttribute(arguments[1]) : e.innerText;", selector, attribute)


def test_dashboard_follows_an_sft_then_dpo_job_end_to_end(service, browser, small_model, small_data, tmp_path):
    client, env, log = service
    base = f"http://127.0.0.1:{env['ALIGN_PORT']}"
    job = client.submit(job_spec(small_model, [sft(small_data), dpo(small_data)]))
    assert job["status"] == "queued" and [s["state"] for s in job["stages"]] == ["queued", "pending"]

    # The key is asked for, kept in sessionStorage and never put in a URL.
    browser.get(f"{base}/ui/#/jobs/{job['id']}")
    wait(browser, lambda d: find(d, "#api-key"))
    find(browser, "#api-key")[0].send_keys(env["ALIGN_BOOTSTRAP_API_KEY"])
    find(browser, "#use-key")[0].click()
    wait(browser, lambda d: find(d, "#job-state [data-state]"))
    assert env["ALIGN_BOOTSTRAP_API_KEY"] not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('align.apiKey')") == env["ALIGN_BOOTSTRAP_API_KEY"]

    def done(driver) -> bool:
        """The page says the job succeeded and holds its losses, or the job ended otherwise (asserted below)."""
        state = read(driver, "#job-state [data-state]", "data-state")
        return "ended" in (read(driver, "#stream-state") or "") and (state in ("failed", "cancelled") or (
            state == "succeeded" and int(read(driver, "figure[data-chart=loss]", "data-points") or 0) >= LOSS_POINTS))

    try:
        wait(browser, done, 600)
    except Exception:
        screenshot(browser, "job")  # what the page showed when it gave up
        raise

    events = list(client.stream_events(job["id"]))  # the job has ended: every event, then the end
    job = client.job(job["id"])
    assert job["status"] == "succeeded", log.read_text()[-3000:]
    retries = [e["payload"] for e in events if e["type"] == "state" and e["payload"].get("error_code")]
    assert [(s["state"], s["attempt"]) for s in job["stages"]] == [("succeeded", 1), ("succeeded", 1)], retries
    transitions = [(e["payload"]["from"], e["payload"]["to"]) for e in events if e["type"] == "state"]
    for stage_transitions in ([("queued", "running"), ("running", "succeeded")], [("pending", "queued")]):
        for transition in stage_transitions:
            assert transition in transitions
    assert any(e["type"] == "metrics" and "loss" in e["payload"] for e in events)

    metrics = {m["name"]: m["records"] for m in client.metrics(job["id"])}
    assert [r["step"] for r in metrics["sft"] if "loss" in r] == [1, 2, 3, 4]
    dpo_first = next(r for r in metrics["dpo"] if r.get("step") == 1 and "loss" in r)
    assert dpo_first["loss"] == pytest.approx(0.6931, abs=1e-3), "DPO starts from the SFT policy as its reference"

    sft_artifact = client.artifact(job["stages"][0]["artifact_id"])
    dpo_artifact = client.artifact(job["stages"][1]["artifact_id"])
    assert sft_artifact["parents"] == [] and dpo_artifact["parents"] == [sft_artifact["id"]]
    assert (sft_artifact["lineage"], dpo_artifact["lineage"]) == ("e2e.sft", "e2e.dpo")
    manifest = dpo_artifact["manifest"]
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.jsonl"} <= set(manifest["files"])
    folder = client.download_artifact(dpo_artifact["id"], tmp_path / "dpo")  # checks every sha256
    assert hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest() == dpo_artifact[
        "manifest_hash"].removeprefix("sha256:")

    # The page: every metrics record came over the stream, read with fetch; the timeline shows each stage's
    # single attempt; the loss chart holds every loss the stages reported.
    records = sum(len(m) for m in metrics.values())
    assert int(read(browser, "#stream-state", "data-metrics-events")) == records
    rows = browser.execute_script("return [...document.querySelectorAll('#stages tr[data-stage]')].map("
                                  "r => [r.dataset.stage, r.dataset.state, r.querySelector('.attempts').innerText])")
    assert rows == [["sft", "succeeded", "1 / 3"], ["dpo", "succeeded", "1 / 3"]]
    assert len(find(browser, "#stages .bar.state-succeeded")) == 2
    losses = {(name, key, r["step"]) for name, m in metrics.items() for r in m for key in ("loss", "eval_loss")
              if key in r}
    assert int(read(browser, "figure[data-chart=loss]", "data-points")) == len(losses)
    wait(browser, lambda d: find(d, f"#artifacts tr[data-artifact-id='{dpo_artifact['id']}'] a.artifact-link"))
    screenshot(browser, "job")

    # Through to the DPO artifact: its SFT parent is listed and drawn in the lineage graph.
    find(browser, f"#artifacts tr[data-artifact-id='{dpo_artifact['id']}'] a.artifact-link")[0].click()
    wait(browser, lambda d: find(d, f"#parents li[data-artifact-id='{sft_artifact['id']}']"))
    parent = find(browser, f"#parents li[data-artifact-id='{sft_artifact['id']}']")[0]
    assert "e2e.sft v" in parent.text
    assert "e2e.dpo v" in find(browser, "#artifact-title")[0].text
    assert find(browser, f"svg.lineage a[data-artifact-id='{sft_artifact['id']}']")
    assert len(find(browser, "svg.lineage path.edge")) == 1
    files = browser.execute_script("return [...document.querySelectorAll('#files tbody tr td:first-child')]"
                                   ".map(c => c.innerText)")
    assert set(files) == set(manifest["files"])
    screenshot(browser, "artifact")

    # The jobs list: the job with its state, stages and tenant.
    browser.get(f"{base}/ui/#/jobs")
    row = f"#jobs-table tr[data-job-id='{job['id']}']"
    wait(browser, lambda d: find(d, row))
    cells = browser.execute_script("return [...document.querySelectorAll(arguments[0])].map(c => c.innerText)",
                                   f"{row} td")
    assert cells[1] == "succeeded" and cells[2].split() == ["sft", "dpo"] and cells[3] == "default"
    screenshot(browser, "jobs")

    # The submit page shows the API's own 422 messages for a spec it would refuse, and queues nothing.
    bad = job_spec(small_model, [sft(small_data), dpo(small_data)], name="e2e-bad")
    bad["stages"][1]["data"]["path"] = str(small_data["prefs"].parent / "missing.jsonl")
    with pytest.raises(ServiceError) as refused:
        client.submit(bad)
    assert refused.value.status == 422 and len(refused.value.errors) >= 1
    jobs_before = [j["id"] for j in client.jobs(limit=100)["data"]]
    browser.get(f"{base}/ui/#/submit")
    editor = wait(browser, lambda d: find(d, "#spec-editor"))[0]
    # The spec is pasted (JSON is YAML), then edited by a keystroke, which is what starts a check.
    browser.execute_script("arguments[0].value = arguments[1]", editor, json.dumps(bad, indent=1)[:-1])
    editor.send_keys("}")
    wait(browser, lambda d: read(d, "#spec-verdict", "data-result") == "invalid")
    verdict = read(browser, "#spec-verdict")
    for field, message in refused.value.errors:
        assert f"{field}: {message}" in verdict
    assert not find(browser, "#submit-job")[0].is_enabled()
    screenshot(browser, "submit")
    assert [j["id"] for j in client.jobs(limit=100)["data"]] == jobs_before
