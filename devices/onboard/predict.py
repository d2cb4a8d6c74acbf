#!/usr/bin/env python3
"""edgepipe predict mode: every sample of an .npz through one artifact, outputs to an .npz (batch of 1).

    python predict.py --artifact m.tflite --format tflite --target cpu --inputs x.npz --predict-out y.npz

`edgepipe eval --device` runs it on a board to score accuracy there. Standalone like agent.py beside
it, whose sessions, MeasureSpec command line and JSON conventions it uses (one JSON object on stdout;
exit 0 ok, 1 error, 3 unavailable). The outputs are dequantized and stacked over samples
(``output_0``, ``output_1``...); the file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, List, Optional

import numpy as np

try:
    from . import agent  # inside the edgepipe package
except ImportError:  # a lone copy next to agent.py (a board, a temp dir)
    import agent  # type: ignore[no-redef]


def run_predict(spec: "agent.MeasureSpec", opener: Optional[Callable] = None) -> dict:
    """Every sample of ``spec.inputs`` through the artifact; the outputs go to ``spec.predict_out``."""
    if not spec.inputs or not spec.predict_out:
        raise agent.AgentError("predict mode needs --inputs (an .npz of preprocessed samples) and --predict-out")
    session, info = agent.open_timed(spec, opener, "predict")
    with session:
        agent.stage("inputs")
        samples, _ = agent.load_inputs(session, spec.inputs, max_samples=None)
        agent.stage("predict")
        t1 = time.perf_counter()
        arrays = agent.collect_outputs(session, samples)
        info.update(predict_s=time.perf_counter() - t1, samples=len(samples))
    tmp = spec.predict_out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, spec.predict_out)
    info.update(predict_out=str(spec.predict_out), status="ok")
    return info


def main(argv: Optional[List[str]] = None, opener_for: Optional[Callable] = None) -> int:
    spec = agent.parse_spec(argv)
    opener = opener_for(spec) if opener_for is not None else None
    return agent.main_with(lambda: run_predict(spec, opener))


if __name__ == "__main__":
    sys.exit(main())
