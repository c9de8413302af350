"""Chaos soak: hundreds of Dagster steps on the real local stack while an injector fires faults at them.

    python -m bench.soak [--sessions 300] [--concurrency 30] [--quick] [--results PATH]

Each session is one ``materialize`` of one asset that calls ``PipesPubSubClient.run`` (or ``run_many`` for a
fan-out of a few shards) on ``bench/soak_function.py``, which logs numbered lines. Faults:

- **redelivery** (targeted): the session's trigger, captured by a tap subscription on the trigger topic, is
  published again while the function runs: the lease must absorb it;
- **late redelivery** (targeted): the same, 0-2 s after the session ended: its tombstone must refuse it
  (it cannot slow the session, so it does not count as a fault in the latencies);
- **duplicate replies** (targeted): reply messages of the session, captured by a tap subscription on the
  reply topic, are published again in reverse order, one of them twice;
- **slow** (targeted): the function sleeps a few seconds between its lines (heartbeats keep it alive);
- **large** (not a fault): a trigger payload and a reply above the inline threshold (both through GCS);
- **kill** (global): the function server is SIGKILLed, then restarted on its port;
- **pause** (global): the Pub/Sub emulator is stopped with SIGSTOP for a few seconds, then SIGCONT.

Targeted faults are planned per session from the seed; global ones fire as the soak passes evenly spaced
points of its progress, and hit every session whose lifetime overlaps them. Printed: sessions succeeded,
failed with a clear error (a ``PipesPubSubError`` naming the problem, by class and message), failed with
anything else (must be 0), hung (not ended within ``--bound`` seconds: must be 0), log lines lost in
successful sessions and shards, duplicated or out of order anywhere, handler runs beyond one per session
(the lease), leaked per-session subscriptions and session objects, and session latency percentiles with
and without faults. The raw samples go to ``--results`` (JSON) for ``bench/plots.py``.
"""

import argparse
import collections
import itertools
import json
import os
import random
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, DagsterInstance, PreviewWarning, asset, materialize
from google.cloud import pubsub_v1, storage

from bench.plots import results_dir
from bench.soak_function import MARKER_BUCKET, MARKER_PREFIX
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.diagnostics.errors import PipesPubSubError
from dagster_gcf_pipes.orchestrator.modes.fanout import FanOutError
from dagster_gcf_pipes.shared.claim_check import ClaimCheck, GCSBlobStore
from dagster_gcf_pipes.shared.lease import read_lease
from dagster_gcf_pipes.shared.protocol import Attr, ProtocolError, Trigger
from dagster_gcf_pipes.shared.pubsub import publisher_client, subscriber_client

TOPIC = "soak-trigger"
REPLY_TOPIC = "pipes-replies"
BUCKET = "pipes-payloads"
PREFIX = "dagster-pipes"
FUNCTION = LocalFunction("bench/soak_function.py", "main", TOPIC)

#: a line as Dagster records it: the shard prefix of a fan-out, then the function's text
LINE = re.compile(r"(?:\[shard (\d+)\] )?soak line (\d+) of (\d+)$")
#: Dagster's console logger says nothing below CRITICAL (its event log still records every line)
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
#: what differs between failures of one kind: timestamps, ids, numbers
VARYING = ((re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+(?:[+-]\d\d:\d\d|Z)?"), "TIME"), (re.compile(r"[0-9a-f]{16,}"), "ID"),
           (re.compile(r"\d+(?:\.\d+)?"), "N"))

REDELIVERY, DUPLICATES, SLOW, KILL, PAUSE = "redelivery", "duplicate replies", "slow", "kill", "pause"
LATE = "late redelivery"
#: a large session's trigger payload and reply: above the client's default inline threshold (1 MB)
LARGE_BYTES = 1_200_000
#: the levels of a server's log lines that the soak reports
COMPLAINTS = ("WARNING", "ERROR", "CRITICAL")
#: a plain log line's level: the dispatcher's ``DATE TIME LEVEL message``, gunicorn's ``[LEVEL] message``
PLAIN_LEVEL = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (.*)$|\[(WARNING|ERROR|CRITICAL)\] (.*)$")


@dataclass
class Session:
    """One Dagster step of the soak and what happened to it."""

    index: int
    shards: int  # 1: run(); more: run_many()
    lines: int
    sleep: float
    planned: list[str]  # targeted faults
    large: bool = False
    faults: set[str] = field(default_factory=set)  # every fault that hit it (targeted and global)
    started: float = 0.0
    ended: float = 0.0
    outcome: str = "pending"  # succeeded | failed | hung
    error: str = ""  # class: summary, for a failure
    clear: bool = True  # a failure with a PipesPubSubError that names the problem
    ok_shards: set[int] = field(default_factory=set)
    recorded: dict[int, list[int]] = field(default_factory=dict)  # shard -> line numbers, in the order recorded

    def token(self, shard: int) -> str:
        return f"s{self.index}-{shard}"

    def payloads(self) -> list[dict[str, Any]]:
        large = {"blob": "p" * LARGE_BYTES, "reply_bytes": LARGE_BYTES} if self.large else {}
        return [{"token": self.token(s), "lines": self.lines, "sleep": self.sleep, **large} for s in range(self.shards)]

    @property
    def seconds(self) -> float:
        return self.ended - self.started


# ---------------------------------------------------------------------------------------------- sessions


def plan(count: int, rng: random.Random) -> list[Session]:
    """The sessions: one in ten a fan-out of 3 to 6 shards, one in ten large; targeted faults drawn per session."""
    sessions = []
    for index in range(count):
        planned = [fault for fault, p in ((REDELIVERY, 0.2), (DUPLICATES, 0.2), (SLOW, 0.1), (LATE, 0.15)) if rng.random() < p]
        sessions.append(Session(
            index=index,
            shards=rng.randint(3, 6) if rng.random() < 0.1 else 1,
            lines=rng.randint(5, 40),
            sleep=rng.uniform(3.0, 8.0) if SLOW in planned else 0.0,
            planned=planned,
            faults={SLOW} if SLOW in planned else set(),
            large=rng.random() < 0.1,
        ))
    return sessions


def blanked(text: str) -> str:
    """The first sentence of ``text`` with timestamps, ids and numbers blanked, so that one kind groups together."""
    first = (text.strip().splitlines() or [""])[0].split(". ")[0]
    for pattern, blank in VARYING:
        first = pattern.sub(blank, first)
    return first[:200]


def summarize(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {blanked(str(exc))}"


def record_failure(session: Session, exc: BaseException) -> None:
    session.outcome = "failed"
    if isinstance(exc, FanOutError):
        failed = [o for o in exc.outcomes if not o.ok]
        session.ok_shards = {o.shard for o in exc.outcomes if o.ok}
        session.clear = all(isinstance(o.error, PipesPubSubError) and str(o.error) for o in failed)
        session.error = "; ".join(sorted({summarize(o.error) for o in failed}))  # type: ignore[arg-type]
        return
    session.clear = isinstance(exc, PipesPubSubError) and bool(str(exc))
    session.error = summarize(exc)


def run_session(client: PipesPubSubClient, session: Session) -> None:
    """Materialize the session's asset; keep its outcome and the line numbers Dagster recorded."""
    raised: list[BaseException] = []

    @asset(name="soak_asset")
    def soak_asset(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        payloads = session.payloads()
        try:
            if session.shards == 1:
                return pipes_pubsub.run(context=context, payload=payloads[0]).get_materialize_result()
            return pipes_pubsub.run_many(context=context, payloads=payloads, max_concurrency=3).get_materialize_result()
        except BaseException as exc:
            raised.append(exc)
            raise

    session.started = time.monotonic()
    with DagsterInstance.ephemeral() as instance:
        result = materialize([soak_asset], resources={"pipes_pubsub": client}, instance=instance,
                             run_config=QUIET, raise_on_error=False)
        entries = instance.all_logs(result.run_id)
    if session.outcome == "hung":  # ended past the bound: it stays counted as hung
        return
    session.ended = time.monotonic()
    for entry in entries:
        match = LINE.search(entry.user_message) if entry.dagster_event is None else None
        if match:
            session.recorded.setdefault(int(match[1] or 0), []).append(int(match[2]))
    if result.success:
        session.outcome, session.ok_shards = "succeeded", set(range(session.shards))
    elif raised:
        record_failure(session, raised[0])
    else:
        session.outcome, session.clear, session.error = "failed", False, "the step failed outside the client call"


# ---------------------------------------------------------------------------------------------- faults


class Taps:
    """Tap subscriptions on the trigger and reply topics: every trigger by session id, with the token of its
    payload, and each session's latest replies, for the injector to publish again."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.subscriber = subscriber_client()
        self.claim_check = ClaimCheck(GCSBlobStore(storage.Client(project=project), BUCKET))
        self.triggers: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.session_of_token: dict[str, str] = {}
        self.replies: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=16))
        self.lock = threading.Lock()
        self.futures = [self._tap(TOPIC, self._on_trigger), self._tap(REPLY_TOPIC, self._on_reply)]

    def _tap(self, topic: str, callback: Any) -> Any:
        path = self.subscriber.subscription_path(self.project, f"soak-tap-{topic}")
        self.subscriber.create_subscription(request={"name": path, "topic": f"projects/{self.project}/topics/{topic}"})
        return self.subscriber.subscribe(path, callback)

    def _on_trigger(self, message: Any) -> None:
        message.ack()
        attributes = dict(message.attributes)
        try:  # a large trigger's body is a claim-check object, there until its session ends
            trigger = Trigger.decode(self.claim_check.unwrap(message.data, attributes), attributes)
        except ProtocolError:
            return  # ended already: nothing to redeliver while it runs
        with self.lock:
            self.triggers[trigger.session_id] = (message.data, attributes)
            self.session_of_token[str(trigger.payload["token"])] = trigger.session_id

    def _on_reply(self, message: Any) -> None:
        message.ack()
        attributes = dict(message.attributes)
        with self.lock:
            self.replies[attributes.get(Attr.SESSION, "")].append((message.data, attributes))

    def session_id(self, token: str) -> str | None:
        with self.lock:
            return self.session_of_token.get(token)

    def close(self) -> None:
        for future in self.futures:
            future.cancel()
        for topic in (TOPIC, REPLY_TOPIC):
            self.subscriber.delete_subscription(
                request={"subscription": self.subscriber.subscription_path(self.project, f"soak-tap-{topic}")}
            )
        self.subscriber.close()


@dataclass
class Window:
    kind: str
    start: float
    end: float


class Injector(threading.Thread):
    """Fires each running session's planned targeted faults once the messages it needs were seen, and the
    global faults when the soak has started the session counts in ``schedule``."""

    def __init__(self, stack: LocalStack, taps: Taps, sessions: Sequence[Session], schedule: list[tuple[int, str]],
                 started: collections.Counter, rng: random.Random) -> None:
        super().__init__(name="soak-injector", daemon=True)
        self.stack, self.taps, self.sessions, self.rng = stack, taps, sessions, rng
        self.schedule, self.started = collections.deque(schedule), started
        self.windows: list[Window] = []
        self.fired: collections.Counter = collections.Counter(s for session in sessions for s in session.planned if s == SLOW)
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.publisher = publisher_client()
        self.due: dict[tuple[int, str], float] = {}
        self.late_done: set[int] = set()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            try:
                if self.schedule and self.started["n"] >= self.schedule[0][0]:
                    self._global(self.schedule.popleft()[1])
                for session in self.sessions:
                    if session.started and session.outcome == "pending":
                        self._targeted(session)
                    elif (due := self.late_due(session)) is not None and time.monotonic() >= due:
                        self.late_done.add(session.index)
                        self.fired[LATE] += self._redeliver(session)
            except Exception as exc:  # noqa: BLE001 - a broken injector is reported, the soak goes on
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def late_due(self, session: Session) -> float | None:
        """When the session's late redelivery is due, if it has one still to fire (its session ended)."""
        if LATE not in session.planned or session.index in self.late_done or session.outcome in ("pending", "hung"):
            return None
        return self.due.setdefault((session.index, LATE), session.ended + self.rng.uniform(0.0, 2.0))

    def late_pending(self) -> bool:
        return any(LATE in s.planned and s.index not in self.late_done and s.outcome != "hung" for s in self.sessions)

    def _redeliver(self, session: Session) -> bool:
        """Publish one of the session's triggers again (a random shard's); False if none was seen."""
        session_id = self.taps.session_id(session.token(self.rng.randrange(session.shards)))
        if session_id is None:
            return False
        data, attributes = self.taps.triggers[session_id]
        self.publisher.publish(f"projects/{self.stack.project}/topics/{TOPIC}", data, **attributes).result(30)
        return True

    def _targeted(self, session: Session) -> None:
        for fault in session.planned:
            if fault in (SLOW, LATE) or fault in session.faults:
                continue
            due = self.due.setdefault((session.index, fault), time.monotonic() + self.rng.uniform(0.0, 1.5))
            if time.monotonic() >= due and (self._redeliver(session) if fault == REDELIVERY else self._duplicate(session)):
                session.faults.add(fault)
                self.fired[fault] += 1

    def _duplicate(self, session: Session) -> bool:
        """Publish up to 4 of a shard's replies again, in reverse order, the first one twice; False if none yet."""
        session_id = self.taps.session_id(session.token(self.rng.randrange(session.shards)))
        with self.taps.lock:
            replies = list(self.taps.replies.get(session_id or "", ()))
        if not replies:
            return False
        picked = self.rng.sample(replies, min(4, len(replies)))
        for data, attributes in [picked[0], *reversed(picked)]:
            self.publisher.publish(f"projects/{self.stack.project}/topics/{REPLY_TOPIC}", data, **attributes).result(30)
        return True

    def _global(self, kind: str) -> None:
        start = time.monotonic()
        if kind == KILL:
            self._kill_function()
        else:
            self._pause_emulator(self.rng.uniform(2.0, 5.0))
        self.windows.append(Window(kind, start, time.monotonic()))
        self.fired[kind] += 1

    def _kill_function(self) -> None:
        server = self.stack.servers[f"function-{TOPIC}"]
        assert server.process is not None
        server.kill(signal.SIGKILL)
        server.process.wait(timeout=10)
        time.sleep(self.rng.uniform(0.2, 1.0))
        self.stack.restart_function(FUNCTION)

    def _pause_emulator(self, seconds: float) -> None:
        process = self.stack.servers["pubsub-emulator"].process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(process.pid, signal.SIGCONT)

    def mark_global_faults(self) -> None:
        for session in self.sessions:
            for window in self.windows:
                if session.started and session.started <= window.end and window.start <= (session.ended or time.monotonic()):
                    session.faults.add(window.kind)


def global_schedule(total: int, kills: int, pauses: int, rng: random.Random) -> list[tuple[int, str]]:
    """Kills and pauses in a shuffled order, at evenly spaced points between 10% and 90% of the sessions started."""
    kinds = [KILL] * kills + [PAUSE] * pauses
    rng.shuffle(kinds)
    return [(round(total * (0.1 + 0.8 * (i + 0.5) / len(kinds))), kind) for i, kind in enumerate(kinds)]


# ---------------------------------------------------------------------------------------------- the run


def run_all(client: PipesPubSubClient, sessions: Sequence[Session], concurrency: int, bound: float,
            started: collections.Counter) -> None:
    """Run the sessions ``concurrency`` at a time; one still running ``bound`` seconds after it started is hung."""
    slots = threading.Semaphore(concurrency)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="soak-session")

    def one(session: Session) -> None:
        try:
            run_session(client, session)
        finally:
            slots.release()

    running: list[tuple[Session, Future]] = []
    for session in sessions:
        while not slots.acquire(timeout=1.0):
            reap(running, bound)
        started["n"] += 1
        session.started = time.monotonic()
        running.append((session, pool.submit(one, session)))
    while any(s.outcome == "pending" for s, _ in running):
        reap(running, bound)
        time.sleep(0.5)
    pool.shutdown(wait=not any(s.outcome == "hung" for s in sessions), cancel_futures=True)


def reap(running: list[tuple[Session, Future]], bound: float) -> None:
    for session, future in running:
        if session.outcome == "pending" and not future.done() and time.monotonic() - session.started > bound:
            session.outcome, session.clear, session.ended = "hung", False, time.monotonic()
        if future.done() and future.exception() is not None and session.outcome == "pending":
            session.outcome, session.clear, session.error = "failed", False, summarize(future.exception())


def leftovers(project: str) -> dict[str, Any]:
    """Per-session subscriptions and session objects still there (ended leases are tombstones, kept on
    purpose and swept later: counted apart), and the handler runs per token."""
    with pubsub_v1.SubscriberClient() as subscriber:
        every = [s.name for s in subscriber.list_subscriptions(request={"project": f"projects/{project}"})]
    subscriptions = [name for name in every if "/dagster-pipes-" in name]
    gcs = storage.Client(project=project)
    objects, tombstones = [], 0
    for blob in gcs.list_blobs(BUCKET, prefix=f"{PREFIX}/"):
        if "/leases/" in f"/{blob.name}" and read_lease(blob).ended:
            tombstones += 1
        else:
            objects.append(blob.name)
    runs = collections.Counter(b.name.split("/")[1] for b in gcs.list_blobs(MARKER_BUCKET, prefix=f"{MARKER_PREFIX}/"))
    return {"every_subscription": every, "subscriptions": subscriptions, "objects": objects, "tombstones": tombstones,
            "runs": runs}


def log_level(line: str) -> tuple[str, str]:
    """(level, message) of a server's log line: the function's JSON lines, the dispatcher's and gunicorn's."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return "", line
        return str(record.get("severity", "")), str(record.get("message", ""))
    match = PLAIN_LEVEL.search(line)
    if match is None:
        return ("ERROR", line) if line.startswith("Traceback") else ("", line)
    return match[1] or match[3], match[2] or match[4]


def complaints(stack: LocalStack) -> collections.Counter:
    """The function's and the dispatcher's log lines at WARNING and above, by server, level and blanked text."""
    found: collections.Counter = collections.Counter()
    for name, server in stack.servers.items():
        if name.startswith(("function-", "dispatcher-")):
            for line in server.log_path.read_text(errors="replace").splitlines():
                level, message = log_level(line)
                if level in COMPLAINTS:
                    found[f"{name} {level}: {blanked(message)}"] += 1
    return found


def percentiles(values: Sequence[float]) -> str:
    if not values:
        return "- / - / -"
    ordered = sorted(values)
    pick = [ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] for q in (0.5, 0.95, 0.99)]
    return " / ".join(f"{v:.2f}" for v in pick)


def line_counts(sessions: Sequence[Session]) -> dict[str, int]:
    """Lines lost in successful sessions and shards, lines duplicated or recorded out of order anywhere."""
    lost = duplicated = reordered = 0
    for session in sessions:
        for shard in range(session.shards):
            recorded = session.recorded.get(shard, [])
            duplicated += len(recorded) - len(set(recorded))
            reordered += sum(1 for a, b in itertools.pairwise(recorded) if b < a)
            if shard in session.ok_shards:
                lost += len(set(range(session.lines)) - set(recorded))
    return {"lost": lost, "duplicated": duplicated, "reordered": reordered}


def report(sessions: Sequence[Session], injector: Injector, left: dict[str, Any], wall: float, args: Any) -> dict[str, Any]:
    """Print the soak's table; return the counts (also written to the results file)."""
    outcomes = collections.Counter(s.outcome for s in sessions)
    clear = [s for s in sessions if s.outcome == "failed" and s.clear]
    unclear = [s for s in sessions if s.outcome == "failed" and not s.clear]
    unexplained = [s for s in sessions if s.outcome == "failed" and not s.faults]
    twice = {token: n for token, n in left["runs"].items() if n > 1}
    counts = {
        "sessions": len(sessions), "shards": sum(s.shards for s in sessions),
        "fan_outs": sum(s.shards > 1 for s in sessions), "succeeded": outcomes["succeeded"],
        "failed_clear": len(clear), "failed_unclear": len(unclear), "failed_without_fault": len(unexplained),
        "hung": outcomes["hung"], **line_counts(sessions), "handler_ran_twice": len(twice),
        "leaked_subscriptions": len(left["subscriptions"]), "leaked_objects": len(left["objects"]),
        "lease_tombstones": left["tombstones"], "faults_fired": dict(injector.fired),
        "large_sessions": sum(s.large for s in sessions), "server_complaints": dict(left["complaints"]),
        "injector_errors": injector.errors, "wall_seconds": round(wall, 1),
    }
    faulted = [s.seconds for s in sessions if s.outcome == "succeeded" and s.faults]
    calm = [s.seconds for s in sessions if s.outcome == "succeeded" and not s.faults]
    fired = ", ".join(f"{k} {v}" for k, v in sorted(injector.fired.items()))
    print(f"\nchaos soak: {len(sessions)} sessions ({counts['fan_outs']} fan-outs, {counts['shards']} function sessions, "
          f"{counts['large_sessions']} large) "
          f"at {args.concurrency} concurrent, {os.cpu_count()} cores, {wall:.0f} s; faults fired: {fired}")
    print("\n| count | value |\n|---|---:|")
    rows = [("sessions succeeded", counts["succeeded"]), ("failed with a clear error", counts["failed_clear"]),
            ("failed with an unclear error", counts["failed_unclear"]),
            ("failed without a fault that explains it", counts["failed_without_fault"]), ("hung", counts["hung"]),
            ("log lines lost", counts["lost"]), ("log lines duplicated", counts["duplicated"]),
            ("log lines out of order", counts["reordered"]), ("handler ran twice for one trigger", counts["handler_ran_twice"]),
            ("leaked subscriptions", counts["leaked_subscriptions"]), ("leaked objects", counts["leaked_objects"])]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\n| failure (class: message) | sessions |\n|---|---:|")
    for error, n in collections.Counter(s.error for s in sessions if s.outcome == "failed").most_common():
        print(f"| {error} | {n} |")
    print("\n| session latency, succeeded | n | p50 / p95 / p99 s |\n|---|---:|---|")
    print(f"| without faults | {len(calm)} | {percentiles(calm)} |")
    print(f"| with faults | {len(faulted)} | {percentiles(faulted)} |")
    for kind in (REDELIVERY, DUPLICATES, SLOW, KILL, PAUSE):
        hit = [s.seconds for s in sessions if s.outcome == "succeeded" and kind in s.faults]
        print(f"| hit by {kind} | {len(hit)} | {percentiles(hit)} |")
    print(f"\nsubscriptions left in the emulator: {', '.join(left['every_subscription']) or 'none'}; "
          f"{left['tombstones']} ended leases (tombstones, swept later by design)")
    print("\n| server log line at WARNING or above (server level: first sentence) | lines |\n|---|---:|")
    for complaint, n in left["complaints"].most_common():
        print(f"| {complaint} | {n} |")
    for what, names in (("leaked subscription", left["subscriptions"]), ("leaked object", left["objects"])):
        for name in names[:20]:
            print(f"{what}: {name}")
    for session in unclear + [s for s in sessions if s.outcome == "hung"]:
        print(f"session {session.index} ({session.outcome}): {session.error}")
    for token, n in twice.items():
        print(f"handler ran {n} times for {token}")
    for error in injector.errors:
        print(f"injector error: {error}")
    return counts


@contextmanager
def soak_stack() -> Iterator[LocalStack]:
    with LocalStack(functions=[FUNCTION], topics=[REPLY_TOPIC], buckets=[BUCKET, MARKER_BUCKET]) as stack, stack.activated():
        yield stack


def main() -> None:
    warnings.filterwarnings("ignore", category=PreviewWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="30 sessions at 10 (the CI variant)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--bound", type=float, default=180.0, help="seconds after which a running session is hung")
    parser.add_argument("--results", type=Path, help="where the raw samples go (JSON; default bench/results/soak.json)")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.concurrency = 30, 10
    rng = random.Random(args.seed)
    sessions = plan(args.sessions, rng)
    schedule = global_schedule(args.sessions, max(1, args.sessions // 100), max(1, args.sessions // 60), rng)
    started: collections.Counter = collections.Counter()
    with soak_stack() as stack:
        client = PipesPubSubClient(
            trigger_topic=TOPIC, reply_topic=REPLY_TOPIC, bucket=BUCKET, prefix=PREFIX, startup_timeout=30.0,
            heartbeat_interval=2.0, heartbeat_timeout=20.0, function_timeout=60.0,
        )
        run_session(client, Session(-1, 1, 1, 0.0, []))  # warm up imports and the function instance
        with stack.provisioning():  # the taps are instruments: they read the emulator itself, beneath the layer
            taps = Taps(stack.project)
        injector = Injector(stack, taps, sessions, schedule, started, rng)
        injector.start()
        clock = time.monotonic()
        run_all(client, sessions, args.concurrency, args.bound, started)
        wall = time.monotonic() - clock
        deadline = time.monotonic() + 30.0
        while injector.late_pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        injector.stopping.set()
        injector.join()
        injector.mark_global_faults()
        time.sleep(3.0)  # late deliveries of redelivered triggers find their tombstones
        taps.close()
        left = {**leftovers(stack.project), "complaints": complaints(stack)}
    counts = report(sessions, injector, left, wall, args)
    results = args.results or results_dir(args.quick) / "soak.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    samples = [{**{k: v for k, v in asdict(s).items() if k not in ("recorded", "ok_shards")},
                "faults": sorted(s.faults), "seconds": s.seconds} for s in sessions]
    results.write_text(json.dumps({"args": {"sessions": args.sessions, "concurrency": args.concurrency,
                                                 "seed": args.seed}, "counts": counts, "sessions": samples}, indent=1))
    if counts["hung"]:
        os._exit(1)  # the hung sessions' threads would keep the interpreter from exiting


if __name__ == "__main__":
    main()
