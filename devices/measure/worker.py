"""The worker: measure a registered runtime the standalone agent does not run itself (the Core ML
reference interpreter, a third-party runtime) with the agent's own method, in a fresh process.

    python -m edgepipe.devices.measure.worker --runtime NAME [--module M] [--file F] <the agent's arguments>

The agent's arguments are a MeasureSpec's ``to_argv()``; the runtime is looked up by (NAME, --target)
in the registry, after importing --module (or loading --file when that module is not importable, e.g.
a test module), and its ``load(artifact, spec)`` session is what the agent's ``run_agent`` measures.
The JSON answer and exit codes are the agent's.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from edgepipe.devices.onboard import agent
from edgepipe.devices.runtimes.base import load_runtime


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Measure a registered runtime with the agent's method.")
    p.add_argument("--runtime", required=True)
    p.add_argument("--module")
    p.add_argument("--file")
    mine, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)

    def opener_for(spec):
        def opener():
            return load_runtime(mine.runtime, spec.target, mine.module, mine.file).load(spec.artifact, spec)
        return opener

    return agent.main(rest, opener_for=opener_for)


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses
    sys.exit(main())
