"""Dagster's own sensor daemon, one iteration at a time, over an in-process code location, on a persistent
instance (SQLite in a temporary DAGSTER_HOME): what the tests see is what a deployment's daemon does with
the sensors' results (run keys, asset events, cursors), including when it dies part-way through a tick."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dagster import DagsterInstance, RunsFilter, instance_for_test
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.scheduler.instigation import InstigatorType, TickStatus
from dagster._core.storage.tags import RUN_KEY_TAG
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.sensor import execute_sensor_iteration

#: runs are created (and their run keys recorded) but never launched: no run queue daemon runs here
QUEUED_RUNS = {"run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}}


class DaemonDied(BaseException):
    """The daemon process died at this point (a BaseException, so that nothing in Dagster catches it)."""


@dataclass
class SensorDaemon:
    instance: DagsterInstance
    workspace: WorkspaceProcessContext
    location_name: str
    started: float = field(default_factory=time.time)
    iterations: int = 0

    def start(self, sensor_name: str) -> None:
        """Start a sensor whose default status is STOPPED, as a user would in the UI."""
        location = self.workspace.create_request_context().get_code_location(self.location_name)
        for repository in location.get_repositories().values():
            if repository.has_sensor(sensor_name):
                self.instance.start_sensor(repository.get_sensor(sensor_name))
                return
        raise KeyError(sensor_name)

    def tick(self) -> Any:
        """One iteration, a minute after the last one (past every sensor's interval); the newest tick."""
        self.iterations += 1
        with freeze_time(self.started + 60 * self.iterations):
            list(execute_sensor_iteration(self.workspace, logging.getLogger("test.sensor_daemon"), None, None))
        return self.latest_tick()

    def latest_tick(self) -> Any:
        (state,) = [
            s for s in self.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR) if s.is_running
        ]
        return self.instance.get_ticks(state.instigator_origin_id, state.selector_id)[0]

    def crash_tick(self) -> None:
        """An iteration in which the daemon dies (a ``DaemonDied`` raised by an injected fault)."""
        try:
            self.tick()
        except DaemonDied:
            return
        raise AssertionError("the injected crash never happened")

    def runs_with_key(self, run_key: str) -> list[Any]:
        return self.instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: run_key}))


@contextmanager
def sensor_daemon(
    location_name: str,
    *,
    python_file: str | None = None,
    module_name: str | None = None,
    attribute: str = "defs",
    overrides: dict[str, Any] | None = None,
    synchronous: bool = False,
) -> Iterator[SensorDaemon]:
    """A persistent instance (queued runs by default, or launched in-process with ``synchronous``) and a daemon
    workspace over the code location ``attribute`` of ``python_file`` or ``module_name``."""
    origin = LoadableTargetOrigin(python_file=python_file, module_name=module_name, attribute=attribute)
    target = InProcessWorkspaceLoadTarget(InProcessCodeLocationOrigin(origin, location_name=location_name))
    settings: dict[str, Any] = (
        {"synchronous_run_coordinator": True, "synchronous_run_launcher": True}
        if synchronous
        else {"overrides": {**QUEUED_RUNS, **(overrides or {})}}
    )
    with instance_for_test(**settings) as instance, create_test_daemon_workspace_context(target, instance) as workspace:
        yield SensorDaemon(instance, workspace, location_name)


__all__ = ["DaemonDied", "QUEUED_RUNS", "SensorDaemon", "TickStatus", "sensor_daemon"]
