"""The gateway's side of the pools of pre-warmed runtimes (`sllm-faas up --pool-size N`): per node, a
zygote process (runtime/server/zygote.py) and N idle members made from it, each of which becomes any
function's instance when assigned.

The gateway process makes itself a child subreaper, so members (double-forked by the zygote) become its
children: `ChildProcess` gives them Popen's poll/wait, and the instance code stops them like spawned
instances (their own process group). A maintainer thread per node keeps the zygote alive (restarted after
a backoff) and the pool full: a member that was assigned or died is replaced. `take` never waits: with no
idle member the caller spawns a runtime as usual, and so it does when an assignment fails.

Each accepted assignment's model is sent to the zygote to `prepare` (its tokenizer preloaded, zygote.py), so
the members forked after it start that model without reading it; idle members forked before a new model was
prepared are replaced. The last PREPARED_MODELS models are prepared again in a restarted zygote.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sllm_faas.common.processes import _proc_stats, die_with_parent, stop_process_group

log = logging.getLogger("sllm.pool")
_PR_SET_CHILD_SUBREAPER = 36
ZYGOTE_BACKOFF_FIRST_S, ZYGOTE_BACKOFF_MAX_S = 0.5, 10.0
MAINTAIN_S = 0.2
PREPARED_MODELS = 4   # as many as the zygote keeps (runtime/model/tokenizer.py PRELOADED_MAX)
# what decides an instance's model and tokenizer (runtime/server/settings.py): the part of its environment sent
PREPARE_ENV = ("SLLM_MODEL", "SLLM_MODEL_STORE", "SLLM_LOADER_SOCKET", "SLLM_LOADER_TIER", "SLLM_CHAT_TEMPLATE")


def become_subreaper() -> None:
    """Orphans among our descendants (the zygotes' members) become our children."""
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_adopted(pgid: int) -> None:
    """Reap our zombie children in process group `pgid`: a subreaper adopts the workers of an instance whose
    master was killed with them, and nobody else waits for those."""
    me = os.getpid()
    for pid, fields in _proc_stats():
        if fields[0] == "Z" and int(fields[1]) == me and int(fields[2]) == pgid:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


class ChildProcess:
    """Popen's poll / wait / pid / returncode for a process that became our child by re-parenting."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:   # not (or no longer) ours to wait for
                    self.returncode = -1
                else:
                    if pid:
                        self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode


@dataclass
class Member:
    id: str
    process: ChildProcess
    socket: Path
    made_at: float = field(default_factory=time.monotonic)
    on_assigned: Callable[[dict], None] = lambda assignment: None

    def assign(self, assignment: dict, timeout_s: float = 5.0) -> bool:
        """Hand the member its instance; False if it is gone or did not accept."""
        if self.process.poll() is not None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(timeout_s)
                connection.connect(str(self.socket))
                connection.sendall(json.dumps(assignment).encode() + b"\n")
                if connection.makefile("rb").readline() != b"ok\n":
                    return False
        except OSError:
            return False
        self.on_assigned(assignment)
        return True


class NodePool:
    """One node's zygote and idle members."""

    def __init__(self, node: str, size: int, directory: Path, log_path: Path,
                 spawn: Callable[[Callable[[], subprocess.Popen]], subprocess.Popen]) -> None:
        self.node, self.size, self.directory, self.log_path = node, size, directory, log_path
        self._spawn = spawn             # runs a Popen on the launcher's long-lived thread (PR_SET_PDEATHSIG)
        self.zygote: subprocess.Popen | None = None
        self.kind = ""                  # "fork" (CPU) or "exec" (CUDA), as the zygote reports
        self.members: list[Member] = []
        self.made = self.replaced = self.zygote_restarts = 0
        self.models: dict[str, dict] = {}   # the models members were assigned (PREPARE_ENV as JSON -> env), newest last
        self._unprepared: list[str] = []      # of those, what the running zygote has not prepared since
        self._preparing = False               # one of them is being prepared now
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._zygote_due = 0.0
        self._thread = threading.Thread(target=self._maintain, name=f"sllm-pool-{node}", daemon=True)

    def start(self) -> NodePool:
        self._thread.start()
        return self

    def take(self) -> Member | None:
        """An idle member, or None (then spawn); the pool refills in the background."""
        with self._lock:
            while self.members:
                member = self.members.pop(0)
                if member.process.poll() is None:
                    self._wake.set()
                    return member
                self.replaced += 1
        self._wake.set()
        return None

    def status(self) -> dict:
        with self._lock:
            idle = [{"id": m.id, "pid": m.process.pid} for m in self.members]
        return {"node": self.node, "size": self.size, "kind": self.kind, "idle": idle, "models": len(self.models),
                "unprepared": len(self._unprepared) + self._preparing,
                "zygote_pid": self.zygote.pid if self.zygote and self.zygote.poll() is None else None,
                "made": self.made, "replaced": self.replaced, "zygote_restarts": self.zygote_restarts}

    def _start_zygote(self) -> None:
        command = [sys.executable, "-m", "sllm_faas.runtime.server.zygote", "--dir", str(self.directory),
                   "--reaper", str(os.getpid())]

        def popen() -> subprocess.Popen:
            with open(self.log_path, "ab") as errors:
                return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                        text=True, bufsize=1, start_new_session=True,
                                        preexec_fn=die_with_parent)  # noqa: PLW1509

        self.zygote = self._spawn(popen)
        line = self.zygote.stdout.readline().split()   # after its imports and warm-up
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"the zygote of {self.node} did not start (log: {self.log_path})")
        self.kind = line[1]
        with self._lock:
            self._unprepared = list(self.models)

    def _assigned(self, assignment: dict) -> None:
        env = {name: assignment["env"][name] for name in PREPARE_ENV if assignment["env"].get(name)}
        key = json.dumps(env, sort_keys=True)
        with self._lock:
            self.models.pop(key, None)
            self.models[key] = env
            while len(self.models) > PREPARED_MODELS:
                self.models.pop(next(iter(self.models)))
            if key not in self._unprepared:
                self._unprepared.append(key)
        self._wake.set()

    def _prepare(self) -> None:
        """Have the zygote prepare each model assigned since; retire idle members forked before a new one."""
        while True:
            with self._lock:
                self._preparing = False
                if not self._unprepared:
                    return
                key = self._unprepared.pop(0)
                env = self.models.get(key)
                self._preparing = env is not None and self.kind == "fork"
            if not self._preparing:   # dropped since, or exec'd (CUDA) members, which inherit nothing
                continue
            asked = time.monotonic()
            self.zygote.stdin.write(f"prepare {key}\n")
            self.zygote.stdin.flush()
            answer = self.zygote.stdout.readline().strip().split(maxsplit=3)
            if not answer:
                raise RuntimeError(f"the zygote of {self.node} exited while preparing {env.get('SLLM_MODEL')}")
            if answer[0] != "prepared":
                log.warning("pool of %s: preparing %s: %s", self.node, env.get("SLLM_MODEL"), " ".join(answer))
                continue
            log.info("pool of %s: prepared %s (%s, %s s)", self.node, answer[3] if len(answer) > 3 else "?",
                     answer[1], answer[2])
            if answer[1] == "new":
                with self._lock:
                    stale = [m for m in self.members if m.made_at < asked]
                    self.members = [m for m in self.members if m.made_at >= asked]
                for member in stale:
                    stop_process_group(member.process, grace_s=0)

    def _make_member(self) -> Member:
        self.made += 1
        member_id = f"{self.node}-{self.made}"
        self.zygote.stdin.write(f"member {member_id}\n")
        self.zygote.stdin.flush()
        answer = self.zygote.stdout.readline().split()
        if len(answer) != 3 or answer[:2] != ["member", member_id]:
            raise RuntimeError(f"the zygote of {self.node} answered {' '.join(answer) or 'nothing'}")
        return Member(member_id, ChildProcess(int(answer[2])), self.directory / f"{member_id}.sock",
                      on_assigned=self._assigned)

    def _maintain(self) -> None:
        while not self._stopping.is_set():
            try:
                self._maintain_once()
            except (OSError, RuntimeError, ValueError) as exc:
                self.zygote_restarts += 1
                delay = min(ZYGOTE_BACKOFF_MAX_S, ZYGOTE_BACKOFF_FIRST_S * 2 ** min(self.zygote_restarts, 8))
                log.warning("pool of %s: %s; a new zygote in %.1f s", self.node, exc, delay)
                if self.zygote is not None:
                    stop_process_group(self.zygote, grace_s=0)
                    self.zygote = None
                self._zygote_due = time.monotonic() + delay
            self._wake.wait(MAINTAIN_S)
            self._wake.clear()

    def _maintain_once(self) -> None:
        if self.zygote is not None and self.zygote.poll() is None:
            self._prepare()
        with self._lock:
            alive = [m for m in self.members if m.process.poll() is None]
            self.replaced += len(self.members) - len(alive)
            self.members = alive
            missing = self.size - len(alive)
        if missing <= 0:
            return
        if self.zygote is None or self.zygote.poll() is not None:
            if time.monotonic() < self._zygote_due:
                return
            self._start_zygote()
            self._prepare()
        for _ in range(missing):
            member = self._make_member()
            deadline = time.monotonic() + 30
            while not member.socket.exists():   # listening once its name appears
                if member.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"member {member.id} of {self.node} did not listen (exit status "
                                       f"{member.process.returncode}; log: {self.log_path})")
                time.sleep(0.002)
            with self._lock:
                if self._stopping.is_set():
                    stop_process_group(member.process, grace_s=0)
                    return
                self.members.append(member)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=60)
        with self._lock:
            members, self.members = self.members, []
        for member in members:
            stop_process_group(member.process, grace_s=1)
        if self.zygote is not None:
            stop_process_group(self.zygote, grace_s=1)


class Pools:
    """Every node's pool, in the gateway process (which becomes a child subreaper for them)."""

    def __init__(self, nodes: list[str], size: int, log_dir: Path,
                 spawn: Callable[[Callable[[], subprocess.Popen]], subprocess.Popen]) -> None:
        become_subreaper()
        self.directory = Path(tempfile.mkdtemp(prefix="sllm-pool-"))   # 0700: only we may assign members
        self.nodes = {}
        for node in nodes:
            (self.directory / node).mkdir(mode=0o700)
            self.nodes[node] = NodePool(node, size, self.directory / node, log_dir / f"pool-{node}.log", spawn).start()

    def take(self, node: str) -> Member | None:
        pool = self.nodes.get(node)
        return pool.take() if pool else None

    def status(self) -> list[dict]:
        return [pool.status() for pool in self.nodes.values()]

    def stop(self) -> None:
        for pool in self.nodes.values():
            pool.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
