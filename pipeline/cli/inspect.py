"""`edgepipe inspect ARTIFACT`: op table, quantization and I/O of a .tflite or .onnx file.

For .tflite the table carries the Edge TPU placement *prediction* (or, for an Edge TPU compiled
file, the placement the compiler chose). Never imports TensorFlow.
"""
from __future__ import annotations

from pathlib import Path

import typer


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
    from rich.table import Table

    from edgepipe.pipeline.cli.main import console

    out = console(stderr=False)
    fmt = info["format"]
    head = f"[bold]{info['path']}[/bold]  {fmt}  {info['size_bytes'] / 1024:.1f} KiB  {info['operators']} ops  "
    if fmt == "tflite":
        head += f"quantization: {info['quantization']}"
        if info.get("edgetpu_compiled"):
            head += "  (Edge TPU compiled)"
    else:
        opsets = ", ".join(f"{k} {v}" for k, v in info["opsets"].items())
        head += f"quantized: {'yes' if info['quantized'] else 'no'}  opsets: {opsets}"
    out.print(head)

    io = Table(title="inputs / outputs", title_justify="left", show_edge=False)
    for c in ("", "name", "dtype", "shape", "quantization"):
        io.add_column(c)
    for role in ("inputs", "outputs"):
        for t in info[role]:
            io.add_row(role[:-1], str(t["name"]), str(t["dtype"]), _shape(t), _quant(t))
    out.print(io)

    if fmt == "tflite":
        et = info["edgetpu"]
        label = ("Edge TPU placement (read from the compiled model)" if et["kind"] == "compiled"
                 else "Edge TPU placement PREDICTION (static rules; not a compiler run)")
        ops = Table(title=label, title_justify="left", show_edge=False)
        if show_ops:
            for c in ("#", "op", "placement", "reason"):
                ops.add_column(c)
            for r in et["ops"]:
                reason = r["reason"] + (f": {r['detail']}" if r.get("detail") else "")
                style = "green" if r["placement"] == "edgetpu" else "yellow"
                ops.add_row(str(r["index"]), r["type"], f"[{style}]{r['placement']}[/{style}]", reason)
        else:
            for c in ("op", "count", "placement", "reason"):
                ops.add_column(c)
            for r in info["op_table"]:
                style = "green" if r["placement"] == "edgetpu" else "yellow"
                ops.add_row(r["type"], str(r["count"]), f"[{style}]{r['placement']}[/{style}]", r["reason"])
        out.print(ops)
        c = et["counts"]
        line = f"{c['edgetpu']} of {c['total']} ops on the Edge TPU, {c['cpu']} on the CPU"
        if et.get("first_cpu_op"):
            f = et["first_cpu_op"]
            line += f"; the Edge TPU segment ends at op {f['index']} {f['type']} ({f['reason']})"
        out.print(line)
        for n in et.get("notes") or []:
            out.print(f"note: {n}")
        dt = ", ".join(f"{k}: {v}" for k, v in info["tensor_dtypes"].items())
        out.print(f"tensor dtypes: {dt}")
    else:
        ops = Table(title="operators", title_justify="left", show_edge=False)
        ops.add_column("op")
        ops.add_column("count", justify="right")
        for r in info["op_table"]:
            ops.add_row(r["type"], str(r["count"]))
        out.print(ops)
        if info["quantized"]:
            q = ", ".join(f"{k} x{v}" for k, v in info["quantization_ops"].items())
            out.print(f"quantization ops: {q}")


def register(app: typer.Typer) -> None:
    @app.command("inspect", no_args_is_help=True)
    def inspect_cmd(
        artifact: Path = typer.Argument(..., help="A .tflite or .onnx file."),
        ops: bool = typer.Option(False, "--ops", help="One row per operator instead of per op type (TFLite)."),
        json_out: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    ):
        """Show an artifact's ops, quantization and I/O; for TFLite, predicted Edge TPU placement."""
        from edgepipe.pipeline.inspect import inspect_artifact

        info = inspect_artifact(artifact)
        if json_out:
            from edgepipe.pipeline.cli.main import emit_json

            emit_json(info)
        else:
            render(info, show_ops=ops)
