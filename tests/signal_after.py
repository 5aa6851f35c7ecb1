"""A launch script whose processes signal themselves right after a library function returns for the
n-th time, as a node going down (SIGKILL) or a scheduler's preemption notice (SIGTERM) would at that
point. $SIGNAL_AFTER is "module:function n SIGNAL RANKS launch/script.py", RANKS "all" or one rank, e.g.
- "kto_scale.trainer:save_checkpoint 1 SIGKILL all launch/train.py": every rank dies right after its
  first checkpoint is complete;
- "kto_scale.trainer:train_step 2 SIGTERM 1 launch/train.py": rank 1 alone gets SIGTERM as the second
  optimizer step of this process ends (a scheduler's signal reaching one node first).
Every process stops at the same point however fast the machine is, so no test has to race a running
job to signal it in time. The arguments are the script's; tests/runs.py's signal_after runs it."""

import importlib
import os
import runpy
import signal
import sys

target, calls, signal_name, ranks, script = os.environ["SIGNAL_AFTER"].split()
module_name, name = target.split(":")
module = importlib.import_module(module_name)
function = getattr(module, name)
returned = 0


def call_then_signal(*args, **kwargs):
    global returned
    result = function(*args, **kwargs)
    returned += 1
    if returned == int(calls) and ranks in ("all", os.environ.get("RANK", "0")):
        os.kill(os.getpid(), getattr(signal, signal_name))
    return result


setattr(module, name, call_then_signal)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
