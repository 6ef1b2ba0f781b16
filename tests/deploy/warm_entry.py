"""Task entry for the warm-runtime tests (stands in for fedrad.client.runtime.gate.main)."""

from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "report":
        print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": argv, "cwd": os.getcwd(),
                          "env": os.environ.get("WARM_TEST_VALUE"), "warm": os.environ.get("FEDRAD_WARM_TASK"),
                          "np": float(np.random.random()), "py": random.random()}), flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        return int(argv[1])
    if mode == "exit":
        sys.exit(int(argv[1]))
    if mode == "sleep":
        with open(argv[1], "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(float(argv[2]))
        return 0
    raise ValueError(mode)
