"""Named fault points for crash testing: a run whose ``FLYWHEEL_FAULT_POINT`` names a point is killed there.

The flywheel promises that a round killed anywhere resumes without duplicates or lost data; the fault-injection
tests and ``bench/faults.py`` check that promise by killing real runs at these points. Unset, a point does nothing.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "FLYWHEEL_FAULT_POINT"


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) != name:
        return
    # SIGKILL, as a crash or the OOM killer would: no cleanup handler, no flush, no finally block runs. A process
    # that leads its own group takes the group (the embedded Prefect server, say) down with it, like a power cut.
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
