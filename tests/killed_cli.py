"""The lmprune command line, killed inside collect as a crash or the OOM killer would:

    python tests/killed_cli.py N ARGS...

runs `lmprune ARGS...` and sends itself SIGKILL as collect starts its forward pass number N + 1
(its calibration pass counts), so N batches are done and no handler runs.
"""

import os
import signal
import sys

from lmprune.cli import main
from lmprune.collect import Collector


def run_killed(after: int, argv: list[str]) -> int:
    forward = Collector._forward
    calls = 0

    def counted(self, batch):
        nonlocal calls
        calls += 1
        if calls > after:
            os.kill(os.getpid(), signal.SIGKILL)
        forward(self, batch)

    Collector._forward = counted
    return main(argv)


if __name__ == "__main__":
    sys.exit(run_killed(int(sys.argv[1]), sys.argv[2:]))
