"""Run a chain of sweeps for ``tests/test_chaos.py``, each in a process of its own.

``python tests/chaos_driver.py PLAN.json`` prints one JSON line: each run's exit status (a
negative number: killed by that signal) and wall time. PLAN holds ``argv`` (the sweep's
arguments), ``log`` (a file for the runs' output) and ``runs``: the chaos event of each run in
turn (``EVENT#N#SIGNAL``, see ``tests/plugins/chaos.py``) or null for a run left alone.

The driver imports the harness once, then forks a child per run: a child is a new process (its
own pid, stores opened afresh, killed for real) that starts in milliseconds instead of the ~8 s
that importing torch, MLflow and Optuna takes here. Nothing is opened before the fork.
"""

import functools
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

torch.set_num_threads(1)  # the same in every run: trial values are bit for bit the same

import bench.data  # noqa: E402
import bench.runner  # noqa: E402  (imported once, before the forks)
import bench.tuning  # noqa: E402
from bench.cli import main_guard  # noqa: E402
from bench.sweep import main  # noqa: E402


def run_child(argv: list[str], chaos: str | None, log: str) -> int:
    pid = os.fork()
    if pid == 0:  # the child: one sweep, then exit without the parent's cleanup
        code = 99
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            print(f"\n===== run: {chaos or 'to the end'} =====", flush=True)
            if chaos:
                os.environ["FREQBENCH_CHAOS"] = chaos
                argv = [*argv, "--plugin", "chaos"]
            code = main_guard(main, "bench.sweep")(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    # the dataset's files read once, here: each child gets them with its memory (~2 s each)
    bench.data._load_fashion_mnist = functools.cache(bench.data._load_fashion_mnist)
    bench.data._load_fashion_mnist(None, False)
    codes, seconds = [], []
    for chaos in plan["runs"]:
        t0 = time.perf_counter()
        codes.append(run_child(plan["argv"], chaos, plan["log"]))
        seconds.append(round(time.perf_counter() - t0, 1))
    print(json.dumps({"codes": codes, "seconds": seconds}))
