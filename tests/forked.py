"""Runs forked from tests/zygote.py: `python launch/x.py` and torchrun's ranks without ~13 s of imports each.

`Forked` is one such process and `Ranks` the ranks of one torchrun job; both offer what the tests use of
subprocess.Popen (pid, poll, communicate), so tests/runs.py hands them out in place of one.
"""

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Variables a run reads when it runs, not when it imports: a run whose environment differs from the
# zygote's only in these can be forked (every other difference could be one a library read at import).
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
            "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
            "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")
RUNTIME_PREFIXES = ("KTO_SCALE_", "WANDB_", "SIGNAL_AFTER", "PYTEST_CURRENT_TEST")

_zygotes: dict = {"env": None, "sockets": [], "servers": [], "failed": False}


def forkable(env: dict[str, str], zygotes: int = 1) -> bool:
    """Whether a run with `env` can be forked, with zygotes 0 .. zygotes-1 started for it. The first call
    fixes the zygotes' environment: `env` less the run-time variables, so that they import what its runs
    would. Each rank of a job is forked from a zygote of its own: like the processes a real launcher
    starts, ranks then differ in their string hash seed (PYTHONHASHSEED), and so in the order they
    iterate sets; a code path that depends on it is not made to agree across ranks by the fork."""
    if os.environ.get("KTO_SCALE_TEST_FORK", "1") == "0":
        return False
    base = {k: v for k, v in env.items() if k not in RANK_ENV and not k.startswith(RUNTIME_PREFIXES)}
    _zygotes["env"] = _zygotes["env"] or base
    if base != _zygotes["env"]:  # forking would be wrong; say why the run costs its imports again
        changed = sorted(k for k in base.keys() | _zygotes["env"].keys() if base.get(k) != _zygotes["env"].get(k))
        warnings.warn(f"started as a plain process, not forked: the environment differs in {changed}", stacklevel=3)
        return False
    if _zygotes["failed"]:
        return False
    try:
        _start_zygotes(zygotes - len(_zygotes["sockets"]))
    except (AssertionError, OSError) as error:  # e.g. a socket path too long for AF_UNIX: slower, still right
        _zygotes["failed"] = True
        warnings.warn(f"every run starts as a plain process: tests/zygote.py could not start: {error}", stacklevel=3)
        return False
    return True


def _start_zygotes(count: int) -> None:
    """Start `count` more zygotes at once and wait until each has imported."""
    started = []
    for _ in range(count):
        folder = tempfile.mkdtemp(prefix="kto-scale-zygote-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        log = open(Path(folder) / "stderr", "w+")  # noqa: SIM115 (the zygote writes it until pytest ends)
        server = subprocess.Popen([sys.executable, "tests/zygote.py", f"{folder}/socket"], cwd=ROOT,
                                  env=_zygotes["env"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                  text=True)
        started.append((server, log, f"{folder}/socket"))
    for server, log, path in started:
        for line in server.stdout:  # imports may log first; "ready ..." once they are done
            if line.startswith("ready"):
                break
        else:
            log.seek(0)
            raise AssertionError(f"tests/zygote.py did not start:\n{log.read()[-6000:]}")
        # A zygote lives as long as this process holds its stdin (the pipe) open.
        _zygotes["servers"].append(server)
        _zygotes["sockets"].append(path)


class Forked:
    """A process that zygote `zygote` forked to run argv (a script and its arguments, or -c and code) in
    `env` from the repo root."""

    def __init__(self, argv: list[str], env: dict[str, str], zygote: int = 0):
        self.args = argv
        self.returncode: int | None = None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._connection.connect(_zygotes["sockets"][zygote])
        with open(os.devnull) as devnull:
            request = json.dumps({"argv": argv, "env": env, "cwd": str(ROOT)}).encode()
            socket.send_fds(self._connection, [request], [devnull.fileno(), out_w, err_w])
        os.close(out_w)
        os.close(err_w)
        self.pid = int(self._receive())
        self._output: dict[int, str] = {}
        self._readers = [threading.Thread(target=self._read, args=(fd,), daemon=True) for fd in (out_r, err_r)]
        for reader in self._readers:
            reader.start()

    def _receive(self) -> str:
        message = self._connection.recv(64)
        assert message, "tests/zygote.py has stopped"
        return message.decode()

    def _read(self, fd: int) -> None:
        with open(fd, encoding="utf-8", errors="replace") as stream:
            self._output[fd] = stream.read()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._connection.setblocking(False)
            try:
                self.returncode = int(self._receive())
            except BlockingIOError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._connection.settimeout(timeout)
            try:
                self.returncode = int(self._receive())
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        for reader in self._readers:
            reader.join()
        self._connection.close()
        return tuple(self._output[fd] for fd in sorted(self._output))

    def kill(self) -> None:
        """SIGKILL the process and everything it started (its process group)."""
        with contextlib.suppress(ProcessLookupError):  # it has ended already
            os.killpg(self.pid, signal.SIGKILL)


class Ranks:
    """The ranks of `torchrun --nproc_per_node N --master_port P script args`, forked with the environment
    torchrun gives its workers. They end as under torchrun: once a rank fails, the others get SIGTERM
    (SIGKILL 30 s later); the job's exit code is 0 if every rank's is, else 1; its output is the ranks'
    output, rank after rank."""

    def __init__(self, num_ranks: int, port: str, argv: list[str], env: dict[str, str]):
        self.args = ["torchrun", "--nproc_per_node", str(num_ranks), "--master_port", port, *argv]
        self.returncode: int | None = None
        self.ranks = [Forked(argv, {**env, **torchrun_env(rank, num_ranks, port)}, zygote=rank)
                      for rank in range(num_ranks)]
        self.pid = self.ranks[0].pid

    def poll(self) -> int | None:
        codes = [rank.poll() for rank in self.ranks]
        if None not in codes:
            self.returncode = 0 if not any(codes) else 1
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        stopping_since = None
        while self.poll() is None:
            failed = any(rank.returncode for rank in self.ranks)
            if failed and stopping_since is None:
                stopping_since = time.monotonic()
                for rank in self.ranks:
                    with contextlib.suppress(ProcessLookupError):  # it has ended already
                        os.killpg(rank.pid, signal.SIGTERM)
            if stopping_since is not None and time.monotonic() > stopping_since + 30:
                self.kill()
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.1)  # how soon a rank's end is noticed; nothing is measured by it
        outputs = [rank.communicate() for rank in self.ranks]
        return "".join(out for out, _ in outputs), "".join(err for _, err in outputs)

    def kill(self) -> None:
        for rank in self.ranks:
            rank.kill()


def torchrun_env(rank: int, num_ranks: int, port: str) -> dict[str, str]:
    """What torchrun (torch.distributed.elastic's local agent) sets for worker `rank` of a one-node job."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(num_ranks), "WORLD_SIZE": str(num_ranks),
            "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(num_ranks), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port, "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "False"}
