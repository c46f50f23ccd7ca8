"""Helpers for the worker tests: a stand-in report endpoint, tickets, and the entrypoint as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rank_report import tensors_digest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent.parent
TOKEN = "test-token"
STEPS = 4
CHECKPOINT_EVERY = 2


class Receiver:
    """A tiny stand-in for the service's report endpoint; records every report it is sent.

    ``fence_when(report)`` decides when to start answering 409; once fenced, every later report is
    answered 409 too, as the service does for a stale attempt. ``unavailable`` counts reports still to
    be answered 503 first. With ``refusal`` set, every report is answered 401 with that detail, as the
    service refuses a forged or expired token.
    """

    def __init__(self):
        self.reports: list[dict] = []
        self.fence_when = lambda report: False
        self.fenced = False
        self.unavailable = 0
        self.refusal: str | None = None
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    if receiver.refusal is not None or self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        status = 401
                    elif receiver.unavailable > 0:
                        receiver.unavailable -= 1
                        status = 503
                    else:
                        receiver.fenced = receiver.fenced or receiver.fence_when(body)
                        status = 409 if receiver.fenced else 200
                    receiver.reports.append({**body, "status": status})
                detail = receiver.refusal if status == 401 and receiver.refusal is not None else "stale attempt"
                answer = json.dumps({"ok": True} if status == 200 else {"detail": detail}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/internal/reports"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_type(self, type_: str, accepted_only: bool = True) -> list[dict]:
        return [r for r in self.reports if r["type"] == type_ and (r["status"] == 200 or not accepted_only)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def make_ticket(receiver: Receiver, spec: dict, root: Path, **fields) -> dict:
    """A ticket (a StageLaunch as JSON) for stage 0 of ``spec``, its folders under ``root``; ``fields``
    replace any field."""
    ticket = {
        "stage_run_id": "sr_0123abcd",
        "attempt": 1,
        "job_id": "job_0123abcd",
        "spec": spec,
        "index": 0,
        "start_policy": None,
        "parents": [],
        "artifact_root": str(root / "artifacts"),
        "work_dir": str(root / "work"),
        "require_checkpoint": False,
        "report": report_to(receiver),
    }
    ticket.update(fields)
    return ticket


def report_to(receiver: Receiver) -> dict:
    """The ticket's report endpoint: the receiver, with the token it accepts."""
    return {"url": receiver.url, "token": TOKEN}


def run_entrypoint(ticket: dict, cluster=None, env: dict | None = None, timeout: float = 300):
    """Run ``python -m workers.entrypoint`` as the Ray job driver would; returns the finished process."""
    full_env = dict(os.environ, ALIGN_TICKET=json.dumps(ticket), **(env or {}))
    full_env.pop("RAY_ADDRESS", None)
    if cluster is not None:
        full_env["RAY_ADDRESS"] = cluster.address
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "workers.entrypoint"], check=False, cwd=REPO, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )
    done.seconds = time.perf_counter() - started
    return done


def output_of(done) -> str:
    return f"exit {done.returncode} after {done.seconds:.0f}s\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}"


def sft_spec(model: Path, data_path: Path, *, num_workers: int = 1, zero_stage: int = 0, steps: int = STEPS) -> dict:
    return {
        "name": "workers",
        "base_model": str(model),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "deepspeed": {"zero_stage": zero_stage, "precision": "fp32"},
        "resources": {"num_workers": num_workers, "cpus_per_worker": 1},
        "stages": [
            {"type": "sft", "data": {"path": str(data_path)}, "batch_size": 2, "max_steps": steps,
             "checkpoint_every": CHECKPOINT_EVERY, "lr": 1e-3, "seed": 7},
        ],
    }


def adapter_digest(uri: str) -> str:
    return tensors_digest(load_file(Path(uri) / "adapter_model.safetensors"))
