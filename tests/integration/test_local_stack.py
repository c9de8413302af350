"""The local stack itself: clear errors when a piece is missing, nothing left running after it stops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dagster_gcf_pipes.local import local_stack
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack, LocalStackError


def test_missing_pubsub_emulator_says_what_to_install(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(local_stack, "PUBSUB_EMULATOR", tmp_path / "no-emulator-here")
    with pytest.raises(LocalStackError, match="apt-get install google-cloud-cli-pubsub-emulator openjdk-17-jre-headless"):
        LocalStack().__enter__()


def test_stack_stops_every_process_it_started():
    with LocalStack(functions=[LocalFunction("examples/sales/function/main.py", "main", "stack-test-trigger")], topics=["stack-test-replies"], buckets=["stack-test-bucket"]) as stack:
        pids = [server.process.pid for server in stack.servers.values()]
        assert len(pids) == 3
        workdir = stack.workdir
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # each server ran in its own process group: none of its processes is left
    assert not workdir.exists()
