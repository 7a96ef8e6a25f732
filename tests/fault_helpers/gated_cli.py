"""Run ``ppl_genmodels.cli.main(ARGS)`` once a gate opens, for the race tests of ``tests/test_faults.py``.

Usage: ``python gated_cli.py READY_FILE GO_FILE ARGS...``. The package is imported
first (seconds of start-up), then READY_FILE is created and the process spins until
GO_FILE exists, so two such processes reach the command within a millisecond of each other.
"""

import os
import sys
import time

from ppl_genmodels.cli import main

ready, go, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
open(ready, "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("gated_cli: the gate never opened")
    time.sleep(0.0005)
sys.exit(main(argv))
