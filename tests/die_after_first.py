"""A launch script whose every process SIGKILLs itself as soon as a library function first returns,
like a node going down at that point. $DIE_AFTER_FIRST is "module:function launch/script.py", e.g.
"kto_scale.trainer:save_checkpoint launch/train.py": every rank dies right after its first checkpoint is
complete. Every process stops at the same point however fast the machine is, so no test has to race a
running job to kill it in time. The arguments are the script's; tests/runs.py's die_after_first runs it."""

import importlib
import os
import runpy
import signal
import sys

target, script = os.environ["DIE_AFTER_FIRST"].split()
module_name, name = target.split(":")
module = importlib.import_module(module_name)
function = getattr(module, name)


def call_then_die(*args, **kwargs):
    function(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


setattr(module, name, call_then_die)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
