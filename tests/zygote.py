"""A process that imports once what every run imports, then forks a child per run (a "zygote").

Each end-to-end run is a launch/ script in a process of its own, and starting one costs ~13 s of CPU
importing torch, transformers, peft, deepspeed and datasets before its first line runs; on two cores the
end-to-end tier spent most of its time there. A child forked from this process starts with those modules
imported and then is what `python launch/x.py args` is: its own process (and process group), its own
environment, working directory, argv and standard streams; the script runs as __main__ and the process
ends as the interpreter ends it. tests/runs.py starts this server and sends it runs; see runs.py's
`_start` for which commands go here and which stay plain subprocesses.

What a fork cannot give a child: a module that read an environment variable at import (HF_HUB_OFFLINE,
OMP_NUM_THREADS, ...) read this server's. runs.py sends here only runs whose environment differs from
this server's in variables read at run time (RANKS_ENV, and KTO_SCALE_*, SIGNAL_AFTER, WANDB_*).

Protocol, one Unix seqpacket connection per run: the client sends a JSON request {"argv", "env", "cwd"}
with three file descriptors (stdin, stdout, stderr) attached; the server answers with the child's pid once
it exists and with its exit status when it ends (its exit code, or -N if signal N killed it, as Popen).
The server stops when its stdin closes, i.e. when the pytest process that started it is gone.

    python tests/zygote.py SOCKET_PATH      # prints "ready ..." once the imports are done
"""

import json
import os
import runpy
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

# What the launch scripts import after parsing their options, and what their runs import on the way.
import deepspeed  # noqa: F401
import deepspeed.runtime.engine  # noqa: F401
import deepspeed.runtime.zero.stage3  # noqa: F401
import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
import torch.distributed.checkpoint  # noqa: F401
import torch.distributed.fsdp  # noqa: F401

import kto_scale.evaluate  # noqa: F401
import kto_scale.export  # noqa: F401
import kto_scale.plan  # noqa: F401
import kto_scale.precompute  # noqa: F401
import kto_scale.trainer  # noqa: F401


def other_threads() -> list[str]:
    """The names of this process's threads besides the main one, except pyarrow's jemalloc background
    thread (which datasets starts): jemalloc's fork handlers make a fork safe with it, as datasets'
    num_proc workers, forked too, rely on."""
    names = [Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task")]
    return [name for name in names[1:] if name != "jemalloc_bg_thd"]


def serve(listener: socket.socket) -> dict:
    """Fork a child per request and report its end; return only in a child, with its request."""
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to wakeup_w
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "request")
    selector.register(wakeup_r, selectors.EVENT_READ, "child ended")
    selector.register(sys.stdin, selectors.EVENT_READ, "pytest")
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select():
            if key.data == "pytest" and not sys.stdin.buffer.read1(1):
                os._exit(0)  # pytest is gone; children that still run are their process groups' business
            if key.data == "child ended":
                os.read(wakeup_r, 512)
                while children:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    connection = children.pop(pid)
                    with connection:
                        connection.sendall(f"{os.waitstatus_to_exitcode(status)}".encode())
            if key.data == "request":
                connection, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
                pid = os.fork()
                if pid == 0:  # the child: leave the server behind
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    selector.close()
                    for fd in (wakeup_r, wakeup_w, listener.fileno(), connection.fileno(),
                               *(c.fileno() for c in children.values())):
                        os.close(fd)
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                        os.close(fd)
                    return json.loads(message)
                for fd in fds:
                    os.close(fd)
                children[pid] = connection
                connection.sendall(f"{pid}".encode())


def run_script(request: dict) -> None:
    """Become `python script args` (or `python -c code args`) in request["cwd"] with request["env"]."""
    os.setsid()  # a process group of its own: a timeout kills it with everything it started
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["argv"][0] == "-c":
        sys.argv = ["-c", *request["argv"][2:]]
        sys.path[0] = ""
        exec(compile(request["argv"][1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    assert not other_threads(), f"the imports started threads {other_threads()}: a child would lack them"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(sys.argv[1])
    server.listen(64)
    print(f"ready after {time.process_time():.1f} s of CPU", flush=True)
    run_script(serve(server))
