"""Run a fedrad CLI's ``main(argv)`` in this fresh process, then report on one JSON line (stderr,
prefixed ``PROBE ``) the exit code, the heavy modules loaded and this process's CPU seconds.

Usage: ``python help_probe.py fedrad.client.cli ARGS...`` (used by test_cli_startup.py).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import resource
import sys

HEAVY = ("torch", "opacus", "flwr", "pydicom", "matplotlib", "numpy", "grpc", "ray")


def main() -> None:
    module, argv = sys.argv[1], sys.argv[2:]
    out = io.StringIO()
    code: object = 0
    with contextlib.redirect_stdout(out):
        try:
            code = importlib.import_module(module).main(argv)
        except SystemExit as exc:
            code = exc.code
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"rc": code, "heavy": sorted(m for m in HEAVY if m in sys.modules),
              "cpu_s": usage.ru_utime + usage.ru_stime, "stdout": out.getvalue()}
    sys.stderr.write("PROBE " + json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
