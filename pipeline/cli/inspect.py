"""`edgepipe inspect ARTIFACT`: op table, quantization and I/O of a .tflite or .onnx file.

For .tflite the table carries the Edge TPU placement *prediction* (or, for an Edge TPU compiled
file, the placement the compiler chose). Never imports TensorFlow.
"""
from __future__ import annotations

from pathlib import Path

import typer
from edgepipe.pipeline import api
from edgepipe.pipeline.cli.common import console, emit_json, table


def _shape(t: dict) -> str:
    s = t.get("shape_signature") or t.get("shape") or []
    return "x".join(str(d) for d in s) if s else "scalar"


def _quant(t: dict) -> str:
    q = t.get("quantization")
    if not q or not q.get("scale"):
        return ""
    scale = q["scale"][0]
    zp = (q.get("zero_point") or [0])[0]
    return f"scale={scale:.6g} zp={zp}"


def render(info: dict, show_ops: bool = False) -> None:
    out = console(stderr=False)
    out.print(_head(info), soft_wrap=True)
    io = table("", "name", "dtype", "shape", "quantization", title="inputs / outputs", title_justify="left",
               show_edge=False)
    for role in ("inputs", "outputs"):
        for t in info[role]:
            io.add_row(role[:-1], str(t["name"]), str(t["dtype"]), _shape(t), _quant(t))
    out.print(io)
    if info["format"] == "tflite":
        _render_tflite(out, info, show_ops)
    else:
        _render_onnx(out, info)


def _head(info: dict) -> str:
    fmt = info["format"]
    head = f"[bold]{info['path']}[/bold]  {fmt}  {info['size_bytes'] / 1024:.1f} KiB  {info['operators']} ops  "
    if fmt == "tflite":
        head += f"quantization: {info['quantization']}"
        if info.get("edgetpu_compiled"):
            head += "  (Edge TPU compiled)"
    else:
        opsets = ", ".join(f"{k} {v}" for k, v in info["opsets"].items())
        head += f"quantized: {'yes' if info['quantized'] else 'no'}  opsets: {opsets}"
    return head


def _placement(p: str) -> str:
    style = "green" if p == "edgetpu" else "yellow"
    return f"[{style}]{p}[/{style}]"


def _render_tflite(out, info: dict, show_ops: bool) -> None:
    et = info["edgetpu"]
    label = ("Edge TPU placement (read from the compiled model)" if et["kind"] == "compiled"
             else "Edge TPU placement PREDICTION (static rules; not a compiler run)")
    if show_ops:
        ops = table("#", "op", "placement", "reason", title=label, title_justify="left", show_edge=False)
        for r in et["ops"]:
            reason = r["reason"] + (f": {r['detail']}" if r.get("detail") else "")
            ops.add_row(str(r["index"]), r["type"], _placement(r["placement"]), reason)
    else:
        ops = table("op", "count", "placement", "reason", title=label, title_justify="left", show_edge=False)
        for r in info["op_table"]:
            ops.add_row(r["type"], str(r["count"]), _placement(r["placement"]), r["reason"])
    out.print(ops)
    c = et["counts"]
    line = f"{c['edgetpu']} of {c['total']} ops on the Edge TPU, {c['cpu']} on the CPU"
    if et.get("first_cpu_op"):
        f = et["first_cpu_op"]
        line += f"; the Edge TPU segment ends at op {f['index']} {f['type']} ({f['reason']})"
    out.print(line, soft_wrap=True)
    for n in et.get("notes") or []:
        out.print(f"note: {n}", soft_wrap=True)
    out.print(f"tensor dtypes: {', '.join(f'{k}: {v}' for k, v in info['tensor_dtypes'].items())}", soft_wrap=True)


def _render_onnx(out, info: dict) -> None:
    ops = table("op", title="operators", title_justify="left", show_edge=False)
    ops.add_column("count", justify="right")
    for r in info["op_table"]:
        ops.add_row(r["type"], str(r["count"]))
    out.print(ops)
    if info["quantized"]:
        q = ", ".join(f"{k} x{v}" for k, v in info["quantization_ops"].items())
        out.print(f"quantization ops: {q}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("inspect", no_args_is_help=True)
    def inspect_cmd(
        artifact: Path = typer.Argument(..., metavar="FILE", help="A .tflite or .onnx file."),
        ops: bool = typer.Option(False, "--ops", help="One row per operator instead of per op type (TFLite)."),
        json_out: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    ):
        """Show an artifact's ops, quantization and I/O; for TFLite, predicted Edge TPU placement."""
        info = api.inspect(artifact)
        if json_out:
            emit_json(info)
        else:
            render(info, show_ops=ops)
