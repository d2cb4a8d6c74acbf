"""`edgepipe inspect ARTIFACT`: op table, quantization and I/O of a .tflite or .onnx file.

For .tflite the table carries the Edge TPU placement *prediction* (or, for an Edge TPU compiled
file, the placement the compiler chose). Never imports TensorFlow. ``--layers`` prints the per-layer
int8 error report (pipeline/inspect_layers.py), which loads the source model when it can.
"""
from __future__ import annotations

from pathlib import Path

from typing import Optional

import typer
from edgepipe.pipeline import api
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.util import quiet_tensorflow
from edgepipe.pipeline.cli.common import console, debug_enabled, emit_json, table
from edgepipe.pipeline.fidelity.render import text_table
from edgepipe.pipeline.logs import terminal


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


def render_layers(found: list) -> None:
    """The per-layer reports: summary, table, worst layers with reasons, where the files went."""
    out = console(stderr=False)
    for item in found:
        out.print(f"[bold]{item.artifact}[/bold]", soft_wrap=True)
        out.print(text_table(item.report), soft_wrap=True, markup=False, highlight=False)
        for n in item.notes:
            out.print(f"note: {n}", soft_wrap=True, markup=False)
        out.print(f"wrote {item.folder / 'layers.json'} and {item.folder / 'layers.html'}", soft_wrap=True)
        out.print("")


def register(app: typer.Typer) -> None:
    @app.command("inspect", no_args_is_help=True)
    def inspect_cmd(
        artifact: Path = typer.Argument(..., metavar="FILE", help="A .tflite or .onnx file; with --layers, an int8 "
                                                                  "artifact of an export or the export folder."),
        ops: bool = typer.Option(False, "--ops", help="One row per operator instead of per op type (TFLite)."),
        layers: bool = typer.Option(False, "--layers", help="Per-layer int8 error against the float model (TFLite, "
                                    "ONNX, Core ML): table, layers.json and an HTML plot; the worst layers and why."),
        artifact_id: Optional[str] = typer.Option(None, "--artifact", help="With --layers and a folder: only this "
                                                                           "artifact id (default: every int8 one)."),
        samples: int = typer.Option(32, "--samples", help="With --layers: calibration images the errors are "
                                                          "measured on."),
        isolated_cap: int = typer.Option(32, "--isolated-cap", help="With --layers: layers that get the isolated "
                                         "pass (only that layer quantized); 0 turns it off."),
        isolated_images: int = typer.Option(16, "--isolated-images", help="With --layers: images of the isolated "
                                            "pass."),
        json_out: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    ):
        """Show an artifact's ops, quantization and I/O; for TFLite, predicted Edge TPU placement. With
        --layers: where int8 departs from the float model, layer by layer, and why."""
        if not layers:
            if artifact_id is not None:
                raise UserError("--artifact applies to --layers", "Add --layers, or inspect the artifact's file")
            info = api.inspect(artifact)
            emit_json(info) if json_out else render(info, show_ops=ops)
            return
        if not debug_enabled():
            quiet_tensorflow()
        with terminal() as term, console(file=term).status("per-layer report") as status:
            found = api.inspect_layers(artifact, artifact=artifact_id, samples=samples, isolated_cap=isolated_cap,
                                       isolated_images=isolated_images, log=not debug_enabled(),
                                       progress=None if json_out else status.update)
        if json_out:
            emit_json([f.to_dict() for f in found] if len(found) > 1 else found[0].to_dict())
        else:
            render_layers(found)
