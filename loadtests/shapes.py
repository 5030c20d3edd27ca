"""Load shapes for the KPI runs: steady, ramp, semi-online burst, and a failover drill.

    LOADTEST_SHAPE=burst locust -f loadtests/locustfile.py,loadtests/shapes.py --headless \\
        -u 20 -r 5 -t 10m --host http://127.0.0.1:8080

Locust uses the first shape class it finds in the files given to ``-f`` and has no option to pick
one in a headless run, so this file defines a single shape, :class:`KpiShape`, which plays the
plan named by ``LOADTEST_SHAPE`` (default ``steady``). Plans are scaled by Locust's own options
(the shape sets ``use_common_options``): ``-u`` is the base user count B, ``-r`` the spawn rate,
``-t`` the length T of the run (default 120 s). The user classes keep their weights throughout.

| plan | users over time |
| --- | --- |
| ``steady`` | B for all of T |
| ``ramp`` | 0 to B in ten equal steps over the first 80 % of T, then B; finds where TTFT bends |
| ``burst`` | B, then 10 x B for one minute in the middle of T (its middle half if T < 2 min), then B |
| ``failover`` | B for all of T, with one replica killed at T/2 (and revived when the test stops) |

The burst is a semi-online job (a back-office run, a partner's import) landing on the same fleet
as the interactive users: it asks whether their TTFT holds, and how fast it recovers after.

**The failover drill.** A shape only controls users, so the kill is an action the shape runs at
T/2, in the background, reported to Locust's statistics as a ``DRILL`` request (its time, and a
failure if the action failed) and to the KPI record as a mark, so the summary can count the
failures after it. The revival runs when the test stops and is only logged. The action, from the
environment:

- ``LOADTEST_KILL_CMD``: a shell command, for real deployments
  (``kubectl -n llm delete pod sglang-interactive-1 --grace-period=0 --force``), and optionally
  ``LOADTEST_RESTORE_CMD``, run when the test stops (a Deployment recreates the pod by itself);
- ``LOADTEST_KILL_SIM``: the base URL of a simulated replica (``http://127.0.0.1:30002``), which is
  told to refuse connections (``POST /sim/faults {"refuse_connections": true}``: its listener and
  idle connections close, ``/health`` stops answering). A refusing replica cannot be reached to be
  revived, so ``LOADTEST_SIM_ADMIN`` names a sibling replica of the same simulator process
  (``http://127.0.0.1:30001``) through which the fault is lifted when the test stops.

What the simulator's kill imitates, and what not: new connections are refused at once and
``/health`` stops answering, as with a dead host; streams already running on the victim finish,
where a real crash cuts them (and since the gateway never retries after the first byte, those
become failures). And, as the simulator stands today, the idle keep-alive connections the gateway
holds to the victim stay open but silent (aiohttp's ``RequestHandler.close()`` on an idle
connection stops serving it without closing the socket), so a request sent on one waits for the
gateway's first-byte timeout, as with a hung host. The summary lists such requests under "still
running when the test stopped", with how long they had run.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import gevent
import orjson
from locust import LoadTestShape

log = logging.getLogger("loadtests")
DEFAULT_RUN_TIME_S = 120.0
BURST_FACTOR = 10
BURST_S = 60.0
RAMP_STEPS = 10
ACTION_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Drill:
    """How to kill one replica mid-run, and how to bring it back."""

    kill_cmd: str | None = None
    restore_cmd: str | None = None
    sim_victim: str | None = None
    sim_admin: str | None = None

    @classmethod
    def from_env(cls, env: os._Environ | dict[str, str] = os.environ) -> Drill:
        drill = cls(env.get("LOADTEST_KILL_CMD"), env.get("LOADTEST_RESTORE_CMD"),
                    env.get("LOADTEST_KILL_SIM"), env.get("LOADTEST_SIM_ADMIN"))
        if not (drill.kill_cmd or drill.sim_victim):
            raise ValueError("the failover shape needs LOADTEST_KILL_CMD (a shell command that kills one "
                             "replica) or LOADTEST_KILL_SIM (a simulated replica's base URL)")
        return drill

    @property
    def target(self) -> str:
        return self.kill_cmd or f"simulated replica {self.sim_victim}"

    def kill(self) -> None:
        if self.kill_cmd:
            _shell(self.kill_cmd)
        else:
            _post_faults(str(self.sim_victim), {"refuse_connections": True})

    def restore(self) -> str | None:
        """Undo the kill; returns what was done, or None if this drill has no way back."""
        if self.kill_cmd:
            if self.restore_cmd:
                _shell(self.restore_cmd)
                return self.restore_cmd
            return None
        if self.sim_admin:
            _post_faults(self.sim_admin, {"port": urlsplit(self.sim_victim).port, "clear": True})
            return f"simulated replica {self.sim_victim} (through {self.sim_admin})"
        return None


def _shell(command: str) -> None:
    subprocess.run(command, shell=True, check=True, timeout=ACTION_TIMEOUT_S, capture_output=True)


def _post_faults(base_url: str, knobs: dict) -> None:
    request = urllib.request.Request(base_url.rstrip("/") + "/sim/faults", data=orjson.dumps(knobs),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def users_at(plan: str, t: float, base: int, run_time: float) -> int:
    """The user count a plan asks for at ``t`` seconds into a run of ``run_time`` seconds."""
    if plan == "ramp":  # steps at 0, 0.8 T / 9, ..., 0.8 T
        step = run_time * 0.8 / (RAMP_STEPS - 1)
        return math.ceil(base * min(RAMP_STEPS, math.floor(t / step) + 1) / RAMP_STEPS)
    if plan == "burst":
        length = min(BURST_S, run_time / 2)
        start = (run_time - length) / 2
        return base * BURST_FACTOR if start <= t < start + length else base
    return base


PLANS = ("steady", "ramp", "burst", "failover")


class KpiShape(LoadTestShape):
    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self.plan = os.environ.get("LOADTEST_SHAPE", "steady")
        if self.plan not in PLANS:
            raise ValueError(f"LOADTEST_SHAPE must be one of {', '.join(PLANS)}, not {self.plan!r}")
        self.drill = Drill.from_env() if self.plan == "failover" else None
        self._killed = False
        self._listening = False

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        base = max(1, options.num_users or 1)
        spawn_rate = float(options.spawn_rate or base)
        run_time = float(options.run_time or DEFAULT_RUN_TIME_S)
        t = self.get_run_time()
        if t >= run_time:
            return None
        if self.drill is not None:
            self._drill_step(t, run_time)
        users = users_at(self.plan, t, base, run_time)
        if self.plan == "ramp":
            spawn_rate = max(spawn_rate, base / RAMP_STEPS)  # each step within a tick
        elif self.plan == "burst":
            spawn_rate = max(spawn_rate, base * (BURST_FACTOR - 1) / 5)  # the burst lands within 5 s
        return users, spawn_rate

    def _drill_step(self, t: float, run_time: float) -> None:
        if not self._listening:
            self.runner.environment.events.test_stop.add_listener(self._restore)
            self._listening = True
        if not self._killed and t >= run_time / 2:
            self._killed = True
            gevent.spawn(self._kill)

    def _kill(self) -> None:
        what = f"kill {self.drill.target}"
        started = time.perf_counter()
        error: Exception | None = None
        try:
            self.drill.kill()
            log.warning("failover drill: %s", what)
        except Exception as exc:  # reported as a failed DRILL request, never raised into the runner
            error = exc
            log.error("failover drill: %s failed: %s", what, exc)
        self.runner.environment.events.request.fire(
            request_type="DRILL", name=what, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=error, context={})

    def _restore(self, **_kwargs) -> None:
        if not self._killed:
            return
        try:
            done = self.drill.restore()
        except Exception as exc:  # the run is over; say so and leave the replica as it is
            log.error("failover drill: restoring failed: %s", exc)
            return
        log.warning("failover drill: %s", f"restored {done}" if done else
                    "nothing restored (no LOADTEST_RESTORE_CMD / LOADTEST_SIM_ADMIN)")
