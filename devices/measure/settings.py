"""What `edgepipe bench` was asked to do: BenchSettings, validated before any measurement, and the
MeasureSpec every row's measurement derives from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.errors import UserError

from edgepipe.devices.onboard.agent import MeasureSpec
from edgepipe.devices.runtimes.base import parse_targets


@dataclass
class BenchSettings:
    targets: list[str] = field(default_factory=lambda: ["cpu"])
    threads: Optional[int] = None  # None: the runner's default_threads() (this host's, or a device's)
    runs: int = 50  # at least this many measured runs ...
    min_seconds: float = 1.0  # ... and at least this long
    warmup: int = 5
    artifacts: Optional[list[str]] = None  # ids; None: all
    profile: bool = False
    timeout_s: float = 600.0  # per row
    inputs: Optional[str] = None  # .npz of preprocessed samples; None: the manifest's, else random
    agreement: bool = True  # compare every target's outputs with the cpu row of the same artifact

    def validate(self) -> "BenchSettings":
        """Bad numbers, targets or inputs raise UserError (one line naming the fix); targets are normalised."""
        checks = ((self.runs < 1, f"--runs must be at least 1 (got {self.runs})", "Use e.g. --runs 50"),
                  (self.warmup < 0, f"--warmup must be 0 or more (got {self.warmup})", "Use e.g. --warmup 5"),
                  (self.min_seconds < 0, f"--min-seconds must be 0 or more (got {self.min_seconds})",
                   "Use e.g. --min-seconds 1"),
                  (self.threads is not None and self.threads < 1, f"--threads must be at least 1 (got {self.threads})",
                   "Leave it out for the default"),
                  (self.timeout_s <= 0, "the timeout must be positive", "Use e.g. --timeout 600"),
                  (self.inputs is not None and not Path(self.inputs or ".").is_file(),
                   f"inputs file {self.inputs} does not exist", "Give an .npz of preprocessed samples"))
        for bad, message, hint in checks:
            if bad:
                raise UserError(message, hint)
        self.targets = parse_targets(self.targets)
        return self

    @property
    def max_seconds(self) -> float:
        """Where the agent stops measuring: half the row's timeout (never less than --min-seconds)."""
        return max(self.min_seconds, 0.5 * self.timeout_s)

    def measure_spec(self, threads: Optional[int]) -> MeasureSpec:
        """The measurement part of these settings; each row adds its artifact, target and files."""
        return MeasureSpec(threads=threads, runs=self.runs, min_seconds=self.min_seconds,
                           max_seconds=self.max_seconds, warmup=self.warmup, profile=self.profile)
