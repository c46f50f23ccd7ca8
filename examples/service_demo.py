"""The main demo: the job service on embedded defaults runs an SFT -> DPO job on the built-in tiny model.

1. starts `align serve` (SQLite under .align/, a local Ray, artifacts under .align/artifacts);
2. POSTs examples/tiny-sft-dpo.yaml and follows it live (per-stage progress: step, loss, ETA);
3. prints the job, both artifacts with their lineage, and what DPO changed on held-out data;
4. stops the service.

Run it with `make demo` (or `.venv/bin/python examples/service_demo.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from align.cli_output import console
from align.cli_service import follow_job, print_artifact
from align.client import Client

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "examples" / "tiny-sft-dpo.yaml"


def start_service(log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "services.cli", "serve"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(os.environ))


def wait_ready(process: subprocess.Popen, log_path: Path, seconds: float = 120) -> Client:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"align serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        client = Client()  # reads the API key the service writes on first start
        if client.ready():
            return client
        client.close()
        time.sleep(0.5)
    raise SystemExit(f"align serve did not become ready in {seconds:.0f} s; see {log_path}")


def held_out_table(client: Client, job: dict) -> Table:
    """Held-out greedy exact match and implicit-reward accuracy: the starting point and after each stage."""
    records = {m["name"]: m["records"] for m in client.metrics(job["id"])}
    evaluations = {name: [r for r in rows if any(k.startswith("eval_") for k in r)] for name, rows in records.items()}
    table = Table(title="held-out evaluation")
    for column in ("after", "exact match (greedy)", "chosen preferred (log-prob)", "implicit-reward accuracy"):
        table.add_column(column)

    def cell(record: dict, key: str) -> str:
        return f"{record[key]:.1%}" if key in record else "-"

    sft_end, dpo_end = evaluations["dpo"][0], evaluations["dpo"][-1]  # dpo step 0 is the SFT policy
    table.add_row("sft", cell(evaluations["sft"][-1], "eval_exact_match"), cell(sft_end, "eval_logp_accuracy"), "-")
    table.add_row("dpo", cell(dpo_end, "eval_exact_match"), cell(dpo_end, "eval_logp_accuracy"),
                  cell(dpo_end, "eval_rewards_accuracy"))
    return table


def main() -> int:
    log_path = REPO / ".align" / "serve.log"
    process = start_service(log_path)
    try:
        client = wait_ready(process, log_path)
        console.print(f"service ready at {client.url} (log: {log_path})")
        job = client.submit(SPEC)
        console.print(f"submitted [bold]{job['id']}[/bold] from {SPEC.relative_to(REPO)}")
        job = follow_job(client, job["id"])
        if job["status"] != "succeeded":
            console.print(f"[red]job {job['status']}[/red]; service log: {log_path}")
            return 1
        console.print("[bold]artifacts[/bold] (lineage: each artifact names the one it was trained from)")
        for stage in job["stages"]:
            print_artifact(client.artifact(stage["artifact_id"]))
        console.print(held_out_table(client, job))
        return 0
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    sys.exit(main())
