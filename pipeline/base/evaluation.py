"""Accuracy records: the figures `edgepipe eval` computes and eval.json stores, typed.

    EvalRow     one artifact x target (x device): status ok | skipped | error, metrics, drops
    EvalResult  the whole evaluation: dataset, source-model metrics, rows (eval.json)

``to_dict()`` writes exactly the keys eval.json has always had (schema_version 1), and
``from_dict()`` reads any eval.json written before (unknown keys are kept and written back).
A standalone artifact (``edgepipe eval FILE``) has no source model: ``source`` is None and its
rows carry top-1/top-5 only (no agreement, drop, lost or gained).

The metric functions are plain numpy. Metrics are percentages.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.manifest import find_manifest
from edgepipe.pipeline.base.recorded import Recorded

EVAL_NAME = "eval.json"
EVAL_KIND = "edgepipe-eval"
EVAL_SCHEMA_VERSION = 1
METRICS = ("top1", "top5", "agreement")
METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "agreement": "agreement"}
ROW_STATUSES = ("ok", "skipped", "error")


# --------------------------------------------------------------------------- metrics
def topk_hits(outputs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image: is the label among the ``k`` largest outputs."""
    k = min(k, outputs.shape[1])
    top = np.argpartition(-outputs, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def classification_metrics(outputs: np.ndarray, labels: np.ndarray,
                           source_pred: Optional[np.ndarray] = None) -> dict:
    """top-1 / top-5 (percent), and agreement with the source's top-1 when given."""
    outputs = np.asarray(outputs, np.float32).reshape(len(labels), -1)
    pred = outputs.argmax(axis=1)
    correct = pred == labels
    d = {"top1": 100.0 * float(correct.mean()), "top5": 100.0 * float(topk_hits(outputs, labels, 5).mean()),
         "correct": int(correct.sum()), "samples": int(len(labels))}
    if not np.isfinite(outputs).all():
        d["non_finite"] = int((~np.isfinite(outputs)).any(axis=1).sum())
    if source_pred is not None:
        d["agreement"] = 100.0 * float((pred == source_pred).mean())
        src_correct = source_pred == labels
        d["lost"] = int((src_correct & ~correct).sum())  # right before, wrong now
        d["gained"] = int((~src_correct & correct).sum())
    return d


def drops(source: dict, art: dict) -> dict:
    """Source metric - artifact metric, in points (agreement: 100 - agreement)."""
    return {"top1": source["top1"] - art["top1"], "top5": source["top5"] - art["top5"],
            "agreement": 100.0 - art["agreement"]}


def chance_level(num_classes: int, samples: int) -> float:
    """The top-1 (percent) a model guessing at random stays below on ``samples`` images, 2 sigma.

    Guessing scores 100/K on average; with N images the figure scatters by
    100*sqrt(p(1-p)/N). A source model at or below this line does not beat guessing on the set.
    """
    p = 1.0 / max(int(num_classes), 2)
    return 100.0 * (p + 2.0 * math.sqrt(p * (1.0 - p) / max(int(samples), 1)))


# --------------------------------------------------------------------------- records
_ROW_CORE = ("artifact", "format", "precision", "sha256", "verification", "target", "runtime", "status")
_OK_ALWAYS = ("top1", "top5", "samples", "images_per_s")


@dataclass
class EvalRow:
    """One artifact on one target. Metrics are set for ``ok`` rows, ``reason`` for the others."""

    artifact: str
    format: Optional[str] = None
    precision: Optional[str] = None
    sha256: Optional[str] = None
    verification: Optional[str] = None
    target: Optional[str] = None
    runtime: Optional[str] = None
    status: str = "ok"  # ok | skipped | error
    reason: Optional[str] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    agreement: Optional[float] = None  # None without a source model
    drop: Optional[dict] = None  # {"top1", "top5", "agreement"} points; None without a source model
    correct: Optional[int] = None
    lost: Optional[int] = None
    gained: Optional[int] = None
    # the counts `check` computes intervals from (added keys; rows written before lack them)
    top5_lost: Optional[int] = None  # images in the source's top-5 and not in the artifact's, and the reverse
    top5_gained: Optional[int] = None
    per_class: Optional[list] = None  # [[class (label), images, lost, gained], ...] top-1 flips by label
    per_class_agreement: Optional[list] = None  # [[class (source top-1), images, disagreements, 0], ...]
    non_finite: Optional[int] = None
    samples: Optional[int] = None
    load_s: Optional[float] = None
    seconds: Optional[float] = None
    images_per_s: Optional[float] = None
    facts: Optional[dict] = None
    device: str = "local"
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept for the round trip

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def flips(self, metric: str) -> Optional[tuple[int, int, int, list]]:
        """(images, lost, gained, per-class counts) the row's drop in ``metric`` comes from; None for a row
        written without them (by an older edgepipe, or a standalone file's). top-1/top-5: images right with
        the source and wrong with the artifact (lost) and the reverse (gained); agreement: the images the
        artifact disagrees on (lost; gained 0), per class of the source's top-1."""
        n = self.samples
        if not n:
            return None
        if metric == "top1" and self.lost is not None and self.gained is not None:
            return n, self.lost, self.gained, self.per_class or []
        if metric == "top5" and self.top5_lost is not None and self.top5_gained is not None:
            return n, self.top5_lost, self.top5_gained, []
        if metric == "agreement" and self.agreement is not None:
            return n, int(round((100.0 - self.agreement) * n / 100.0)), 0, self.per_class_agreement or []
        return None

    @property
    def where(self) -> Optional[str]:
        """``target``, or ``target@device`` for a row evaluated on a registered device."""
        if self.device in (None, "local"):
            return self.target
        return f"{self.target or '-'}@{self.device}"

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _ROW_CORE}
        for f in fields(self):
            if f.name in _ROW_CORE or f.name in ("device", "extra"):
                continue
            v = getattr(self, f.name)
            if v is not None or (self.ok and f.name in _OK_ALWAYS):
                d[f.name] = v
        d["device"] = self.device
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalRow":
        names = {f.name for f in fields(cls)} - {"extra"}
        row = cls(**{k: v for k, v in d.items() if k in names})
        row.extra = {k: v for k, v in d.items() if k not in names}
        if row.device is None:
            row.device = "local"
        return row


@dataclass
class EvalResult:
    """An evaluation: what eval.json holds. ``source`` is None for a standalone artifact."""

    model: str
    dataset: dict
    source: Optional[dict]
    results: list[EvalRow] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    device: str = "local"
    manifest: Optional[str] = "manifest.json"
    created: Optional[str] = None
    edgepipe_version: Optional[str] = None
    seconds: Optional[float] = None
    tensorflow_imported: bool = False
    schema_version: int = EVAL_SCHEMA_VERSION
    kind: str = EVAL_KIND
    unit: str = "percent"
    notes: list[str] = field(default_factory=list)  # warnings for the reader (written only when there are some)
    extra: dict = field(default_factory=dict)
    ledger: Optional[Recorded] = None  # where it was recorded (set after eval.json is written; never in it)

    @property
    def errors(self) -> list[EvalRow]:
        return [r for r in self.results if r.status == "error"]

    def at_chance(self) -> Optional[str]:
        """Why the source model's accuracy on this set is no baseline (it does not beat guessing among
        the set's classes), or None. Old eval.json files without a class count are not judged."""
        k = int(self.dataset.get("classes") or 0)
        if not self.source or k < 2:
            return None
        n = int(self.source.get("samples") or self.dataset.get("samples") or 0)
        if self.source["top1"] > chance_level(k, n):
            return None
        return (f"the source model scores {self.source['top1']:.1f} % top-1 on {n} images, no better than "
                f"guessing among the set's {k} classes ({100.0 / k:.1f} %)")

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "kind": self.kind, "created": self.created,
                "edgepipe_version": self.edgepipe_version, "model": self.model, "manifest": self.manifest,
                "targets": list(self.targets), "device": self.device, "unit": self.unit,
                "dataset": self.dataset, "source": self.source, "results": [r.to_dict() for r in self.results],
                "seconds": self.seconds, "tensorflow_imported": self.tensorflow_imported,
                **({"notes": list(self.notes)} if self.notes else {}), **self.extra,
                **({"ledger": self.ledger.to_dict()} if self.ledger is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        names = {f.name for f in fields(cls)} - {"extra", "results", "ledger"}
        res = cls(**{k: v for k, v in d.items() if k in names and k in d},
                  results=[EvalRow.from_dict(r) for r in d.get("results") or []])
        res.extra = {k: v for k, v in d.items() if k not in names and k != "results"}
        return res

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def read_eval(path: str | os.PathLike) -> EvalResult:
    """An eval.json file -> EvalResult. Bad input raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {EVAL_NAME} in {path.parent}",
                        f"Run `edgepipe eval {path.parent} --data DIR|digits` first")
    try:
        d: Any = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}", "Re-run `edgepipe eval`") from e
    v = d.get("schema_version") if isinstance(d, dict) else None
    if not isinstance(v, int) or d.get("kind") != EVAL_KIND:
        raise UserError(f"{path} is not an edgepipe eval file", "Re-run `edgepipe eval`")
    if v > EVAL_SCHEMA_VERSION:
        raise UserError(f"{path} has schema {v}, newer than this edgepipe understands ({EVAL_SCHEMA_VERSION})",
                        "Upgrade edgepipe")
    return EvalResult.from_dict(d)


def load_eval(folder: str | os.PathLike) -> tuple[EvalResult, Path]:
    """eval.json of a model folder (or beside a manifest, or the eval.json itself)."""
    p = Path(folder)
    path = p if p.is_file() and p.name == EVAL_NAME else find_manifest(p).parent / EVAL_NAME
    return read_eval(path), path
