"""`make dev`: the local stack with everything the example code location uses, and `dagster dev` on it.

    python -m examples.sales.dev [--port 3000]

Prints the UI address; Ctrl-C stops `dagster dev` and then every process of the stack. The code location
(`examples/sales/definitions.py`) reads the stack's endpoints from the same environment variables it reads
on GCP, so what runs here is what you deploy.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dagster_gcf_pipes.local import LocalFunction, LocalStack

#: what examples/sales/definitions.py expects by default (see its PIPES_* environment variables)
TRIGGER_TOPIC = "pipes-trigger"
FUNCTION_SOURCE = Path(__file__).parent / "function" / "main.py"
LANDING_TOPIC = "landing-notifications"


def example_stack() -> LocalStack:
    return LocalStack(
        functions=[LocalFunction(FUNCTION_SOURCE, "main", TRIGGER_TOPIC)],
        topics=["pipes-replies", "pipes-detached-replies", LANDING_TOPIC],
        buckets=["pipes-payloads", "data-lake"],
        subscriptions={"pipes-detached-completions": "pipes-detached-replies", "landing-objects": LANDING_TOPIC},
    )


def _wait_for_ui(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"dagster dev exited with {process.returncode} before the UI came up")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the Dagster UI did not come up at {url} within {timeout:g}s")


def _stop(process: subprocess.Popen) -> None:
    """Stop `dagster dev` and everything it started (its own process group): SIGTERM, then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    # Ctrl-C, and a plain `kill` too (a shell starts background jobs with SIGINT ignored)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    print("starting the local stack (Pub/Sub emulator, fake-gcs-server, Functions Framework) ...", flush=True)
    with example_stack() as stack:
        command = [sys.executable, "-m", "dagster", "dev", "-m", "examples.sales.definitions",
                   "-h", "127.0.0.1", "-p", str(args.port)]
        process = subprocess.Popen(
            command, cwd=Path(__file__).parents[2], env={**os.environ, **stack.environment}, start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{args.port}"
            _wait_for_ui(url, process)
            print(f"\nDagster UI: {url}   (local stack: {stack.environment}; Ctrl-C stops everything)\n", flush=True)
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            print("stopping dagster dev, then the local stack ...", flush=True)
            _stop(process)


if __name__ == "__main__":
    sys.exit(main())
