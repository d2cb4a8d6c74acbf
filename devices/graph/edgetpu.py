"""The Edge TPU target: what will run where, before anyone reaches a Coral board.

The placement predictor (the compiler driver and its log parser live in
``edgepipe.export.edgetpu_compiler``, the runtime in ``edgepipe.devices.runtimes.edgetpu``):

* ``analyze_tflite(path) -> PlacementReport`` - a static *prediction* of op placement from the
  rules Coral publishes ("TensorFlow models on the Edge TPU": model requirements and the
  supported-operations table). Works everywhere, no compiler needed.
* ``compile_edgetpu(...) -> CompileResult`` / ``parse_compiler_log(text)`` - runs
  ``edgetpu_compiler`` when it is installed (x86-64 Linux only) and reads what it decided.
* ``EdgeTPURuntime`` - runs compiled artifacts through LiteRT with ``libedgetpu.so.1``.

Rules applied by ``analyze_tflite`` (each placement carries the rule that decided it):

* tensors: activations must be 8-bit quantized (int8/uint8 with a scale); float or 16/32-bit
  activation tensors send the op to the CPU. Constant float tensors do too (weights must be
  quantized). Model parameters (weights/bias of Conv2d, DepthwiseConv2d, FullyConnected,
  TransposeConv) must be compile-time constants.
* shapes: static only (a -1 in shape_signature sends the op to the CPU); "if a tensor has more
  than 3 dimensions, only the 3 innermost may have a size greater than 1" (so batch must be 1);
  tensors of rank > 4 go to the CPU (a conservative rule of ours: the table's ops are 4-D at most).
* the supported-ops table with its published per-op limits (see ``SUPPORTED_OPS``).
* single partition: without ``-a`` the compiler maps one Edge TPU subgraph. Ops before the first
  mappable op (typically a float->int8 QUANTIZE of float inputs) run on the CPU ahead of it; once
  the Edge TPU segment has started, the first op that cannot be mapped and *every later op* run
  on the CPU ("after first CPU op (single partition)"), as the compiler logs show with
  "More than one subgraph is not supported".

What the analysis cannot know: the compiler also declines ops for "unspecified limitation"s,
for operator versions it does not support and for large activations ("Certain reshapes might
not be mapped for large tensor sizes"). So this is a prediction, and labelled as one
(``report.kind == "prediction"``); a compile log, when there is one, is the ground truth.

No TensorFlow import in this module.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from edgepipe.pipeline.base.errors import GateFailure
from edgepipe.devices.graph.tflite_graph import (EDGETPU_CUSTOM_OP, OpDesc, TensorDesc, TFLiteGraph, read_tflite)

EDGETPU = "edgetpu"
CPU = "cpu"
PREDICTION = "prediction"
COMPILED_GRAPH = "compiled"

REQUIREMENTS_URL = "https://coral.ai/docs/edgetpu/models-intro/"

# Reasons (short, stable strings: reports group by them).
R_MAPPED = "supported"
R_AFTER = "after first CPU op (single partition)"
R_NOT_SUPPORTED = "op not supported"
R_DYNAMIC = "dynamic shape"
R_UNQUANTIZED = "unquantized 8-bit tensor"
R_NON_CONST_WEIGHTS = "weights/bias not constant"
R_RANK = "tensor rank > 4"
R_INNER3 = "more than 3 dimensions > 1"
R_COMPILED = "compiled into edgetpu-custom-op"
R_LEFT_BY_COMPILER = "left on CPU by the compiler"

_ACTIVATIONS_OK = {"NONE", "RELU", "RELU6", "RELU_N1_TO_1"}
_EIGHT_BIT = {"int8", "uint8"}
_CONST_PARAM_TYPES = {"int8", "uint8", "int32", "int64"}  # quantized weights, int32 bias, shape/axis operands


# --------------------------------------------------------------------------------------------
# per-op constraints from the supported-operations table
# --------------------------------------------------------------------------------------------
Check = Callable[[TFLiteGraph, OpDesc], Optional[tuple[str, str]]]  # -> (reason, detail) or None


def _act(op: OpDesc) -> str:
    return str(op.options.get("fused_activation_function", "NONE"))


def _no_fused_activation(g, op):
    a = _act(op)
    if a != "NONE":
        return "fused activation not allowed", f"{op.opcode} with fused {a}: the table allows no fused activation"
    return None


def _fused_activation_supported(g, op):
    a = _act(op)
    if a not in _ACTIVATIONS_OK:
        return (f"fused {a} activation",
                f"fused {a} is not an Edge TPU activation (Relu, Relu6, ReluN1To1 are)")
    return None


def _const_inputs(positions: tuple[int, ...]):
    def check(g, op):
        for pos in positions:
            if pos < len(op.inputs) and op.inputs[pos] >= 0:
                t = g.tensor(op.inputs[pos])
                if not t.is_constant:
                    return (R_NON_CONST_WEIGHTS,
                            f"input {pos} ('{t.name}') is computed at run time; model parameters must be constant")
        return None
    return check


def _same_dilation(g, op):
    w, h = op.options.get("dilation_w_factor", 1), op.options.get("dilation_h_factor", 1)
    if w != h:
        return "dilation differs in x and y", f"dilation {h}x{w}: must use the same dilation in x and y"
    return None


def _fc_default_format(g, op):
    fmt = op.options.get("weights_format", "DEFAULT")
    if fmt not in ("DEFAULT", 0):
        return "weights format not default", f"weights_format {fmt}: only the default format is supported"
    return None


def _one_dim(shape: list[int]) -> bool:
    """'One-dimensional' as the table means it: at most the innermost dimension is larger than 1."""
    return all(int(d) == 1 for d in shape[:-1]) if shape else True


def _fc_output_1d(g, op):
    t = g.tensor(op.outputs[0])
    if not _one_dim(t.shape_signature):
        return "output not one-dimensional", f"output shape {t.shape_signature}: FullyConnected output must be 1-D"
    return None


def _concat(g, op):
    consts = [g.tensor(i) for i in op.inputs if i >= 0 and g.tensor(i).is_constant]
    if consts:
        if len(op.inputs) != 2:
            return ("constant input with > 2 inputs",
                    "a constant input is allowed only with exactly 2 inputs (a zero-padding concat)")
        v = g.constant_value(consts[0])
        if v is None or np.any(v != _zero_point(consts[0])):
            return "constant input not all zeros", "a constant input must be all zeros (effectively zero padding)"
    return None


def _zero_point(t: TensorDesc) -> int:
    q = t.quantization or {}
    zp = q.get("zero_point") or [0]
    return int(zp[0])


def _axes(g, op, pos=1) -> Optional[list[int]]:
    if pos >= len(op.inputs) or op.inputs[pos] < 0:
        return None
    v = g.constant_value(g.tensor(op.inputs[pos]))
    if v is None:
        return None
    rank = len(g.tensor(op.inputs[0]).shape_signature)
    return sorted({int(a) % rank for a in np.asarray(v).ravel()}) if rank else []


def _no_batch_axis(what: str):
    def check(g, op):
        rank = len(g.tensor(op.inputs[0]).shape_signature)
        axes = _axes(g, op)
        if axes is None:
            return "axes not constant", f"{op.opcode} axes are computed at run time"
        if rank >= 2 and 0 in axes:
            return f"{what} batch dimension", f"{op.opcode} over axis 0 (batch) is not supported"
        return None
    return check


def _mean(g, op):
    r = _no_batch_axis("reduces")(g, op)
    if r:
        return r
    shape = g.tensor(op.inputs[0]).shape_signature
    axes = _axes(g, op) or []
    if shape and (len(shape) - 1) in axes and len(shape) >= 3 and int(shape[-1]) % 4 != 0:
        return ("z-reduction depth not multiple of 4",
                f"MEAN over the channel axis of depth {shape[-1]}: the z-dimension must be a multiple of 4")
    return None


def _pad(g, op):
    if len(op.inputs) < 2:
        return None
    v = g.constant_value(g.tensor(op.inputs[1]))
    if v is None:
        return "paddings not constant", "PAD paddings are computed at run time"
    v = np.asarray(v).reshape(-1, 2)
    if v.shape[0] >= 2 and np.any(v[0] != 0):
        return "pads batch dimension", f"PAD pads axis 0 (batch) by {v[0].tolist()}"
    return None


def _pack(g, op):
    if int(op.options.get("axis", 0)) == 0:
        return "packs batch dimension", "PACK along axis 0 (batch) is not supported"
    return None


def _split(g, op):
    # SPLIT inputs: (axis, value)
    v = g.constant_value(g.tensor(op.inputs[0])) if op.inputs and op.inputs[0] >= 0 else None
    if v is None:
        return "axis not constant", "SPLIT axis is computed at run time"
    rank = len(g.tensor(op.inputs[1]).shape_signature)
    if rank >= 2 and int(np.asarray(v).ravel()[0]) % rank == 0:
        return "splits batch dimension", "SPLIT along axis 0 (batch) is not supported"
    return None


def _prelu(g, op):
    alpha = g.tensor(op.inputs[1])
    if not _one_dim(alpha.shape_signature):
        return ("alpha not 1-D",
                f"PReLU alpha of shape {alpha.shape_signature}: only the innermost dimension may exceed 1 "
                "(Keras PReLU needs shared_axes=[1, 2])")
    return None


def _resize(g, op):
    t = g.tensor(op.inputs[0])
    s = t.shape_signature
    if not (len(s) == 3 or (len(s) == 4 and int(s[0]) == 1)):
        return "input not 3-D", f"{op.opcode} input {s}: input/output must be a 3-D tensor (batch 1)"
    return None


def _softmax(g, op):
    t = g.tensor(op.inputs[0])
    if not _one_dim(t.shape_signature):
        return "softmax input not 1-D", f"SOFTMAX input {t.shape_signature}: only 1-D input is supported"
    if t.num_elements > 16000:
        return "softmax > 16000 elements", f"SOFTMAX over {t.num_elements} elements: at most 16,000"
    return None


def _squeeze(g, op):
    shape = g.tensor(op.inputs[0]).shape_signature
    rank = len(shape)
    dims = [int(d) % rank for d in (op.options.get("squeeze_dims") or [])] if rank else []
    if not dims:
        dims = [i for i, d in enumerate(shape) if int(d) == 1]
    for a in dims:
        if any(int(d) != 1 for d in shape[:a]):
            return ("squeeze needs relayout",
                    f"SQUEEZE of axis {a} in {shape}: only leading 1s may be squeezed (no relayout)")
    return None


def _strided_slice(g, op):
    if op.options.get("ellipsis_mask", 0):
        return "ellipsis mask set", "STRIDED_SLICE needs ellipsis-axis-mask == 0"
    if op.options.get("new_axis_mask", 0):
        return "new axis mask set", "STRIDED_SLICE needs new-axis-mask == 0"
    if len(op.inputs) >= 4 and op.inputs[3] >= 0:
        v = g.constant_value(g.tensor(op.inputs[3]))
        if v is None:
            return "strides not constant", "STRIDED_SLICE strides are computed at run time"
        if np.any(np.asarray(v) != 1):
            return "strides != 1", f"STRIDED_SLICE strides {np.asarray(v).tolist()}: all strides must be 1"
    return None


def _all(*checks: Check) -> Check:
    def check(g, op):
        for c in checks:
            r = c(g, op)
            if r:
                return r
        return None
    return check


@dataclass(frozen=True)
class OpRule:
    table_name: str  # as the Coral table names it
    limitation: str  # the published "known limitations" text ("" when none)
    check: Optional[Check] = None


_conv = _all(_same_dilation, _fused_activation_supported, _const_inputs((1, 2)))

#: The Edge TPU supported-operations table (Coral, "TensorFlow models on the Edge TPU"),
#: keyed by TFLite builtin name. Ops not listed here run on the CPU.
SUPPORTED_OPS: dict[str, OpRule] = {
    "ADD": OpRule("Add", "", _fused_activation_supported),
    "AVERAGE_POOL_2D": OpRule("AveragePool2d", "No fused activation function.", _no_fused_activation),
    "CONCATENATION": OpRule(
        "Concatenation",
        "No fused activation function. If any input is a compile-time constant tensor, there must be only "
        "2 inputs, and this constant tensor must be all zeroes (effectively, a zero-padding op).",
        _all(_no_fused_activation, _concat)),
    "CONV_2D": OpRule("Conv2d", "Must use the same dilation in x and y dimensions.", _conv),
    "DEPTHWISE_CONV_2D": OpRule("DepthwiseConv2d", "Must use the same dilation in x and y dimensions.", _conv),
    "EXPAND_DIMS": OpRule("ExpandDims", ""),
    "FULLY_CONNECTED": OpRule(
        "FullyConnected",
        "Only the default format is supported for fully-connected weights. Output tensor is one-dimensional.",
        _all(_fc_default_format, _fc_output_1d, _fused_activation_supported, _const_inputs((1, 2)))),
    "L2_NORMALIZATION": OpRule("L2Normalization", ""),
    "LOGISTIC": OpRule("Logistic", ""),
    "UNIDIRECTIONAL_SEQUENCE_LSTM": OpRule("LSTM", "Unidirectional LSTM only."),
    "LSTM": OpRule("LSTM", "Unidirectional LSTM only."),
    "MAXIMUM": OpRule("Maximum", ""),
    "MAX_POOL_2D": OpRule("MaxPool2d", "No fused activation function.", _no_fused_activation),
    "MEAN": OpRule("Mean", "No reduction in batch dimension. If a z-reduction, the z-dimension must be "
                           "multiple of 4.", _mean),
    "MINIMUM": OpRule("Minimum", ""),
    "MUL": OpRule("Mul", "", _fused_activation_supported),
    "PACK": OpRule("Pack", "No packing in batch dimension.", _pack),
    "PAD": OpRule("Pad", "No padding in batch dimension.", _pad),
    "PRELU": OpRule("PReLU", "Alpha must be 1-dimensional (only the innermost dimension can be >1 size).",
                    _prelu),
    "QUANTIZE": OpRule("Quantize", ""),
    "REDUCE_MAX": OpRule("ReduceMax", "Cannot operate on the batch dimension.", _no_batch_axis("reduces")),
    "REDUCE_MIN": OpRule("ReduceMin", "Cannot operate on the batch dimension.", _no_batch_axis("reduces")),
    "RELU": OpRule("ReLU", ""),
    "RELU6": OpRule("ReLU6", ""),
    "RELU_N1_TO_1": OpRule("ReLUN1To1", ""),
    "RESHAPE": OpRule("Reshape", "Certain reshapes might not be mapped for large tensor sizes."),
    "RESIZE_BILINEAR": OpRule("ResizeBilinear", "Input/output is a 3-dimensional tensor. Depending on "
                              "input/output size, this operation may not be mapped to the Edge TPU to "
                              "avoid loss in precision.", _resize),
    "RESIZE_NEAREST_NEIGHBOR": OpRule("ResizeNearestNeighbor", "Input/output is a 3-dimensional tensor. "
                                      "Depending on input/output size, this operation may not be mapped "
                                      "to the Edge TPU to avoid loss in precision.", _resize),
    "RSQRT": OpRule("Rsqrt", ""),
    "SLICE": OpRule("Slice", ""),
    "SOFTMAX": OpRule("Softmax", "Supports only 1-D input tensor with a max of 16,000 elements.", _softmax),
    "SPACE_TO_DEPTH": OpRule("SpaceToDepth", ""),
    "SPLIT": OpRule("Split", "No splitting in batch dimension.", _split),
    "SQUEEZE": OpRule("Squeeze", "Supported only when input tensor dimensions that have leading 1s "
                                 "(that is, no relayout needed).", _squeeze),
    "STRIDED_SLICE": OpRule("StridedSlice", "Supported only when all strides are equal to 1, and with "
                            "ellipsis-axis-mask == 0, and new-axis-mask == 0.", _strided_slice),
    "SQUARED_DIFFERENCE": OpRule("Squared-difference", ""),
    "SUB": OpRule("Sub", "", _fused_activation_supported),
    "SUM": OpRule("Sum", "Cannot operate on the batch dimension.", _no_batch_axis("reduces")),
    "TANH": OpRule("Tanh", ""),
    "TRANSPOSE": OpRule("Transpose", ""),
    "TRANSPOSE_CONV": OpRule("TransposeConv", "", _const_inputs((1, 3))),
}

#: Ops whose outputs the table flags as "may not be mapped" depending on size: noted, not moved.
_MAY_DECLINE = {"RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"}


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
@dataclass
class OpPlacement:
    index: int
    type: str
    version: int
    placement: str  # "edgetpu" | "cpu"
    reason: str  # short rule name
    detail: str = ""  # the specific fact (tensor, shape, value)
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"index": self.index, "type": self.type, "placement": self.placement, "reason": self.reason,
                "detail": self.detail}


@dataclass
class PlacementReport:
    model: str
    kind: str = PREDICTION  # "prediction" (static rules) | "compiled" (read from a compiled graph)
    basis: str = ("static analysis against Coral's published Edge TPU model requirements and "
                  "supported-operations table; the compiler may still decline ops")
    ops: list[OpPlacement] = field(default_factory=list)
    first_cpu_op: Optional[dict] = None  # the op that ended the Edge TPU segment
    leading_cpu_ops: int = 0  # CPU ops ahead of the Edge TPU segment (e.g. float->int8 QUANTIZE)
    parameter_bytes: int = 0  # constant data used by the ops predicted on the Edge TPU
    other_subgraphs: int = 0
    notes: list[str] = field(default_factory=list)
    compiler: Optional[dict] = None  # filled when a real compile ran (see CompileResult.summary())

    @property
    def counts(self) -> dict:
        n_tpu = sum(1 for o in self.ops if o.placement == EDGETPU)
        return {EDGETPU: n_tpu, CPU: len(self.ops) - n_tpu, "total": len(self.ops)}

    @property
    def fully_mapped(self) -> bool:
        return bool(self.ops) and all(o.placement == EDGETPU for o in self.ops)

    @property
    def cpu_ops(self) -> list[OpPlacement]:
        return [o for o in self.ops if o.placement == CPU]

    def by_type(self) -> list[dict]:
        """One row per (op type, placement, reason), in order of first appearance, like the compiler's log."""
        rows: dict[tuple, dict] = {}
        for o in self.ops:
            key = (o.type, o.placement, o.reason)
            if key not in rows:
                rows[key] = {"type": o.type, "count": 0, "placement": o.placement, "reason": o.reason}
            rows[key]["count"] += 1
        return list(rows.values())

    def to_dict(self, ops_detail: bool = False) -> dict:
        return {
            "kind": self.kind,
            "basis": self.basis,
            "model": self.model,
            "counts": self.counts,
            "fully_mapped": self.fully_mapped,
            "first_cpu_op": self.first_cpu_op,
            "leading_cpu_ops": self.leading_cpu_ops,
            "parameter_bytes": self.parameter_bytes,
            "by_type": self.by_type(),
            "ops": [asdict(o) if ops_detail else o.row() for o in self.ops],
            "other_subgraphs": self.other_subgraphs,
            "notes": list(self.notes),
            "compiler": self.compiler,
        }

    def table(self, cpu_only: bool = False, limit: Optional[int] = None) -> str:
        return format_ops_table([o.row() for o in self.ops if not cpu_only or o.placement == CPU], limit)


def format_ops_table(rows: list[dict], limit: Optional[int] = None) -> str:
    """A compact fixed-width table of op rows (index, type, placement, reason)."""
    shown = rows if limit is None else rows[:limit]
    if not shown:
        return ""
    w_type = max(4, *(len(str(r.get("type", ""))) for r in shown))
    lines = [f"{'#':>4}  {'type':<{w_type}}  {'placement':<9}  reason"]
    for r in shown:
        idx = r.get("index")
        idx = f"{idx:>4}" if isinstance(idx, int) else f"{'x' + str(r.get('count', '')):>4}"
        reason = r.get("reason", "")
        if r.get("detail"):
            reason = f"{reason}: {r['detail']}"
        lines.append(f"{idx}  {str(r.get('type', '')):<{w_type}}  {r.get('placement', ''):<9}  {reason}")
    if limit is not None and len(rows) > limit:
        lines.append(f"      ... and {len(rows) - limit} more")
    return "\n".join(lines)


def _tensor_brief(t: Optional[TensorDesc]) -> dict:
    if t is None:
        return {"index": -1}
    q = t.quantization or {}
    return {"index": t.index, "name": t.name, "dtype": t.dtype, "shape": t.shape_signature,
            "constant": t.is_constant, "quantized": t.quantized,
            "scale": (q.get("scale") or [None])[0] if q else None,
            "zero_point": (q.get("zero_point") or [None])[0] if q else None}


def _generic_check(g: TFLiteGraph, op: OpDesc) -> Optional[tuple[str, str]]:
    """Tensor rules of the model requirements (types, static shapes, dimensions)."""
    ins = [t for t in g.op_inputs(op) if t is not None]
    outs = [t for t in g.op_outputs(op) if t is not None]
    activations = [t for t in ins if not t.is_constant] + outs
    for t in activations:
        if t.dtype not in _EIGHT_BIT:
            return f"{t.dtype} tensor", f"'{t.name}' is {t.dtype}; Edge TPU tensors must be 8-bit quantized"
        if not t.quantized:
            return R_UNQUANTIZED, f"'{t.name}' is {t.dtype} without quantization parameters"
    for t in ins:
        if t.is_constant and t.dtype not in _CONST_PARAM_TYPES:
            return (f"{t.dtype} constant",
                    f"'{t.name}' is {t.dtype}; parameters must be quantized to 8 bits")
    for t in activations:
        if t.is_dynamic:
            return R_DYNAMIC, f"'{t.name}' has shape {t.shape_signature} (-1 = dynamic)"
    for t in activations:
        s = t.shape_signature
        if len(s) > 3 and any(int(d) > 1 for d in s[:-3]):
            return R_INNER3, f"'{t.name}' has shape {s}; only the 3 innermost dimensions may be > 1"
    for t in activations:
        if t.rank > 4:
            return R_RANK, f"'{t.name}' is {t.rank}-D {t.shape_signature}"
    return None


def check_op(g: TFLiteGraph, op: OpDesc) -> Optional[tuple[str, str]]:
    """(reason, detail) when this op cannot be mapped on its own merits, else None."""
    if op.is_custom:
        if op.custom_code == EDGETPU_CUSTOM_OP:
            return None
        return R_NOT_SUPPORTED, f"custom op '{op.custom_code}' is not in the Edge TPU supported-ops table"
    r = _generic_check(g, op)
    if r:
        return r
    rule = SUPPORTED_OPS.get(op.opcode)
    if rule is None:
        return R_NOT_SUPPORTED, f"{op.opcode} is not in the Edge TPU supported-ops table"
    if rule.check is not None:
        return rule.check(g, op)
    return None


def analyze_graph(g: TFLiteGraph, ops_detail: bool = True) -> PlacementReport:
    sg = g.main
    report = PlacementReport(model=str(g.path), other_subgraphs=len(g.subgraphs) - 1)
    if g.is_edgetpu_compiled:
        return _read_compiled(g, report)

    started = False
    first_cpu: Optional[OpPlacement] = None
    params = 0
    may_decline: dict[str, list[int]] = {}
    for op in sg.operators:
        verdict = check_op(g, op)
        if first_cpu is not None:
            placement = CPU
            reason, detail = verdict or (
                R_AFTER, f"op {first_cpu.index} ({first_cpu.type}) runs on the CPU and the compiler maps only "
                         "the first Edge TPU subgraph")
        elif verdict is None:
            placement, (reason, detail) = EDGETPU, (R_MAPPED, "")
            started = True
        else:
            placement, (reason, detail) = CPU, verdict
            if not started:
                report.leading_cpu_ops += 1
        p = OpPlacement(index=op.index, type=op.opcode, version=op.version, placement=placement,
                        reason=reason, detail=detail)
        if ops_detail:
            p.inputs = [_tensor_brief(t) for t in g.op_inputs(op)]
            p.outputs = [_tensor_brief(t) for t in g.op_outputs(op)]
            p.options = dict(op.options)
        if placement == CPU and started and first_cpu is None:
            first_cpu = p
            report.first_cpu_op = {"index": p.index, "type": p.type, "reason": p.reason, "detail": p.detail}
        if placement == EDGETPU:
            params += sum(t.nbytes for t in g.op_inputs(op) if t is not None and t.is_constant)
            if op.opcode in _MAY_DECLINE:
                may_decline.setdefault(op.opcode, []).append(op.index)
        report.ops.append(p)
    report.parameter_bytes = int(params)
    for opcode, idx in may_decline.items():
        shown = ", ".join(str(i) for i in idx[:8]) + (", ..." if len(idx) > 8 else "")
        report.notes.append(f"{opcode} (op {shown}): the supported-ops table says it may not be mapped "
                            "depending on tensor sizes")
    if params > 6 * 2**20:
        report.notes.append(f"{params / 2**20:.1f} MiB of parameters: the Edge TPU caches about 8 MiB on chip; "
                            "the rest streams from off-chip memory each inference (slower)")
    if report.other_subgraphs:
        report.notes.append(f"{report.other_subgraphs} more subgraph(s) (control flow) were not analysed; "
                            "their ops run on the CPU")
    if report.leading_cpu_ops and started:
        report.notes.append(f"{report.leading_cpu_ops} op(s) run on the CPU before the Edge TPU segment "
                            "(float inputs need a QUANTIZE on the CPU; export with int8 or uint8 I/O)")
    return report


def _read_compiled(g: TFLiteGraph, report: PlacementReport) -> PlacementReport:
    """An already-compiled model: placement is a fact of the file, not a prediction."""
    report.kind = COMPILED_GRAPH
    report.basis = "read from an Edge TPU compiled model: edgetpu-custom-op runs on the Edge TPU, the rest on the CPU"
    for op in g.main.operators:
        tpu = op.custom_code == EDGETPU_CUSTOM_OP
        report.ops.append(OpPlacement(index=op.index, type=op.opcode, version=op.version,
                                      placement=EDGETPU if tpu else CPU,
                                      reason=R_COMPILED if tpu else R_LEFT_BY_COMPILER))
    first = next((o for o in report.ops if o.placement == CPU), None)
    if first is not None:
        report.first_cpu_op = {"index": first.index, "type": first.type, "reason": first.reason, "detail": ""}
    return report


def analyze_tflite(path: Union[str, Path], ops_detail: bool = True) -> PlacementReport:
    """Predict which ops of a .tflite model the Edge TPU compiler maps (see module docstring)."""
    return analyze_graph(read_tflite(path), ops_detail=ops_detail)


def require_full_edgetpu(report: Union[PlacementReport, dict], limit: int = 15) -> None:
    """Raise GateFailure, with a compact table of the offending ops, unless every op maps to the Edge TPU.

    Accepts a PlacementReport, its ``to_dict()``, or the ``ExportResult.extra["edgetpu"]`` dict.
    """
    if isinstance(report, PlacementReport):
        d = report.to_dict()
    else:
        d = dict(report)
    compiled = bool(d.get("compiled"))
    rows: list[dict]
    if compiled and d.get("compiler_ops"):
        rows = [dict(r, type=r.get("type") or r.get("op")) for r in d["compiler_ops"] if r.get("placement") == CPU]
    else:
        rows = [r for r in d.get("ops", []) if r.get("placement") == CPU]
    counts = d.get("counts") or {}
    n_cpu = int(counts.get(CPU, 0) or 0) if counts else len(rows)
    if n_cpu == 0 and not rows:
        if not counts.get("total", 1):
            raise GateFailure("the model has no operators to map to the Edge TPU",
                              "Check the exported artifact")
        return
    total = counts.get("total") or (n_cpu + int(counts.get(EDGETPU, 0) or 0))
    source = "according to edgetpu_compiler" if compiled else "predicted (no compiler run)"
    first = d.get("first_cpu_op")
    head = f"{n_cpu} of {total} ops run on the CPU, not the Edge TPU ({source})"
    if first:
        head += f"; first: op {first.get('index')} {first.get('type')} ({first.get('reason')})"
    table = format_ops_table(rows, limit)
    raise GateFailure(f"{head}\n{table}",
                      f"Replace or move these ops (see {REQUIREMENTS_URL}), or drop --require-full-edgetpu")


