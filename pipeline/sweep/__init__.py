"""`edgepipe sweep`: many models x formats x precisions x devices, on Ray or in one process.

plan.py (the plan), cells.py (the one adapter over the library), jobs.py (the units of work),
engine.py (serial / Ray), raynet.py (Ray as an optional extra, nodes with devices, loopback),
state.py (the output folder, resume), run.py (the orchestration), report.py + render.py (the
merged report and its gate). See docs/sweep.md.
"""
