"""`edgepipe devices` (list), `edgepipe devices add`, `edgepipe devices remove`.

`edgepipe devices` lists this host's targets and then every registered device: reachable or why not, its CPU/ABI, Python and runtime versions, and which targets it offers,
each with the reason where it does not. The registry is devices/remote.py's (``--config PATH``,
``$EDGEPIPE_CONFIG``, or ``$XDG_CONFIG_HOME/edgepipe/devices.json``). Never imports TensorFlow.
"""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from edgepipe.devices.measure import host
from edgepipe.devices import Registry, make_device, make_runner
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.cli.common import console, emit_json, table

_CONFIG_HELP = "Device registry file (default: $EDGEPIPE_CONFIG, else $XDG_CONFIG_HOME/edgepipe/devices.json)."


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="List this host's targets and the registered remote devices; add or remove devices.",
                      invoke_without_command=True, no_args_is_help=False, add_completion=False,
                      pretty_exceptions_enable=False, rich_markup_mode=None)
    sub.callback(invoke_without_command=True)(devices)
    sub.command("add", help="Register an ssh board (ssh://user@host[:port]) or an adb device (adb://SERIAL or "
                            "adb://host:port), checking that it answers.")(add)
    sub.command("remove", help="Forget a registered device.")(remove)
    app.add_typer(sub, name="devices")


# --------------------------------------------------------------------------------------------- helpers
def describe(runner) -> dict:
    """One registered device, as `devices --json` prints it (reachability, facts, targets offered)."""
    ident = runner.identity()
    facts = ident.get("facts") or {}
    cpu = facts.get("cpu") or {}
    out = {"name": runner.name, "kind": ident.get("kind"), "url": ident.get("url"), "address": ident.get("address"),
           "runner": ident.get("runner"), "reachable": runner.error is None,
           "error": runner.error.one_line() if runner.error is not None else None,
           "cpu": {k: cpu.get(k) for k in ("model", "arch", "abi", "usable_cores") if cpu.get(k) is not None},
           "os": facts.get("os"), "python": facts.get("python"), "python_path": facts.get("python_path"),
           "versions": {k: v for k, v in (facts.get("versions") or {}).items() if v},
           "targets": ident.get("targets") or {}}
    for k in ("mode_reason", "benchmark_binary"):
        if ident.get(k):
            out[k] = ident[k]
    if facts.get("android"):
        out["android"] = facts["android"]
    if facts.get("python_error"):
        out["python_error"] = facts["python_error"]
    if facts.get("numpy_error"):
        out["numpy_error"] = facts["numpy_error"]
    return out


def probe_device(dev, registry, benchmark_binary: Optional[str] = None) -> dict:
    runner = make_runner(dev, registry, benchmark_binary)
    with runner:
        return describe(runner)


def _offer_text(offers: dict) -> tuple[str, list[str]]:
    """{'cpu': {'tflite': True, 'onnx': 'reason'}, ...} -> ('cpu: tflite onnx · gpu: tflite', [reasons])."""
    parts, reasons = [], []
    for t, fm in offers.items():
        ok = [f for f, v in fm.items() if v is True]
        if ok:
            parts.append(f"{t}: {' '.join(ok)}")
        for f, v in fm.items():
            if v is not True and v and v != "not probed":
                reasons.append(f"{t} {f}: {v}")
    return " · ".join(parts) or "none", reasons


# --------------------------------------------------------------------------------------------- devices
def devices(
    ctx: typer.Context,
    json_: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    config: Optional[str] = typer.Option(None, "--config", help=_CONFIG_HELP),
    no_probe: bool = typer.Option(False, "--no-probe", help="List registered devices without contacting them."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    registry = Registry(config)
    remote = []
    for name in sorted(registry.devices):
        dev = registry.devices[name]
        if no_probe:
            remote.append({"name": name, "kind": dev.kind, "url": dev.url, "address": dev.address,
                           "reachable": None, "error": "not contacted (--no-probe)"})
        else:
            remote.append(probe_device(dev, registry))
    if json_:
        emit_json({"host": host.host_facts(), "targets": host.target_table(), "config": str(registry.path),
                   "devices": [{"name": "local", "kind": "local", "reachable": True}] + remote})
        return
    con = console(stderr=False)
    print_local(con, host.host_facts(), host.target_table())
    if not remote:
        con.print(f"No remote devices registered ({registry.path}). Add one with "
                  f"`edgepipe devices add NAME ssh://user@host` or `adb://SERIAL`.", soft_wrap=True)
        return
    print_remote(con, remote, str(registry.path))


def print_local(con: Console, facts: dict, rows: list[dict]) -> None:
    """This host: CPU, memory, OS, then one row per (target, runtime): available, or why not."""
    cpu = facts["cpu"]
    con.print(f"[bold]{cpu['model']}[/] ({cpu['arch']}), {cpu['usable_cores']} usable of {cpu['logical_cores']} "
              f"logical cores, {(facts.get('memory_bytes') or 0) / 2**30:.1f} GiB · {facts['os']}", soft_wrap=True)
    if cpu.get("isa"):
        con.print(f"ISA: {', '.join(cpu['isa'])}", soft_wrap=True)
    t = table("Target", "Runtime", "Formats", "Status", "Versions / reason")
    for r in rows:
        vers = ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())
        status = "[green]available[/]" if r["available"] else "[yellow]unavailable[/]"
        detail = vers if r["available"] else (r.get("reason") or "")
        if r["available"] and r.get("details", {}).get("note"):
            detail += f"\n{r['details']['note']}"
        t.add_row(r["target"], r["runtime"], ",".join(r["formats"]), status, detail)
    con.print(t)
    for r in rows:
        for a in (r.get("details") or {}).get("vulkan_adapters", []) or []:
            con.print(f"Vulkan adapter: {a['name']} ({a['type']}, Vulkan {a['vulkan']})")
    for g in facts.get("nvidia_gpus") or []:
        con.print(f"NVIDIA GPU: {g['name']} (driver {g['driver']}, {g['memory']})")
    for d in facts.get("edgetpu_devices") or []:
        con.print(f"Edge TPU: {d['name']} ({d.get('id') or d.get('path')})")


def print_remote(con: Console, remote: list[dict], where: str) -> None:
    """One row per registered device: reachable or why not, CPU/ABI, Python, runtimes, targets offered."""
    t = table("Device", "Address", "Reachable", "CPU / ABI", "Python", "Runtimes", "Targets offered",
              title=f"Registered devices ({where})", show_lines=False)
    notes = []
    for d in remote:
        if d.get("reachable") is None:
            t.add_row(d["name"], d.get("url", ""), "-", "-", "-", "-", "-")
            continue
        if not d["reachable"]:
            t.add_row(d["name"], d.get("url", ""), "[red]no[/]", "-", "-", "-", "-")
            notes.append(f"{d['name']}: {d['error']}")
            continue
        cpu = d.get("cpu") or {}
        abi = cpu.get("abi") or cpu.get("arch") or "?"
        cpu_txt = f"{cpu.get('model') or '?'} ({abi}, {cpu.get('usable_cores')} cores)"
        vers = ", ".join(f"{k} {v}" for k, v in (d.get("versions") or {}).items())
        offers, reasons = _offer_text(d.get("targets") or {})
        t.add_row(d["name"], d.get("url", ""), "[green]yes[/]", cpu_txt, d.get("python") or "-", vers or "-",
                  f"{offers} ({d.get('runner')})")
        notes += [f"{d['name']} {r}" for r in reasons]
        if d.get("mode_reason"):
            notes.append(f"{d['name']}: {d['mode_reason']}")
    con.print(t)
    for n in notes:
        con.print(f"  {n}", soft_wrap=True)


# --------------------------------------------------------------------------------------------- add / remove
def _parse_env(items: Optional[list[str]]) -> dict:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise UserError(f"--env '{it}' is not NAME=VALUE", "Use e.g. --env OMP_NUM_THREADS=4")
        out[k] = v
    return out


def add(
    name: str = typer.Argument(..., help="A short name for the device (used by `bench --device NAME`)."),
    url: str = typer.Argument(..., help="ssh://user@host[:port], adb://SERIAL or adb://host:port."),
    key: Optional[str] = typer.Option(None, "--key", help="ssh private key (identity file) for this device."),
    accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key",
                                             help="Record the device's ssh host key on first contact "
                                                  "(StrictHostKeyChecking=accept-new); a changed key is still "
                                                  "refused."),
    known_hosts: Optional[str] = typer.Option(None, "--known-hosts",
                                              help="ssh known_hosts file, or 'user' for ssh's default "
                                                   "(default: edgepipe's own, next to the registry)."),
    python: Optional[str] = typer.Option(None, "--python", help="The device's Python (default: python3)."),
    tmpdir: Optional[str] = typer.Option(None, "--tmpdir",
                                         help="Where temp dirs go on the device "
                                              "(default: $TMPDIR or /tmp; /data/local/tmp on Android)."),
    env: Optional[list[str]] = typer.Option(None, "--env", help="NAME=VALUE for the remote agent (repeatable)."),
    benchmark_binary: Optional[str] = typer.Option(None, "--benchmark-binary",
                                                   help="adb: TFLite's benchmark_model built for the device."),
    via: Optional[str] = typer.Option(None, "--via", help="adb: agent, benchmark_model or auto (default)."),
    connect_timeout: Optional[float] = typer.Option(None, "--connect-timeout", help="Seconds (default 10)."),
    replace: bool = typer.Option(False, "--replace", help="Replace a device of the same name."),
    no_check: bool = typer.Option(False, "--no-check", help="Register without contacting the device."),
    config: Optional[str] = typer.Option(None, "--config", help=_CONFIG_HELP),
    json_: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    registry = Registry(config)
    dev = make_device(name, url, key=key, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key,
                      python=python, tmpdir=tmpdir, env=_parse_env(env), benchmark_binary=benchmark_binary, via=via,
                      connect_timeout=connect_timeout)
    registry.add(dev, replace=replace)
    info = None
    if not no_check:
        runner = make_runner(dev, registry)
        with runner:
            info = describe(runner)
        if runner.error is not None:
            e = runner.error
            raise UserError(f"device '{name}' was not registered: {e.message}",
                            (e.hint + " " if e.hint else "") + "(or pass --no-check to register it without contact)")
    path = registry.save()
    if json_:
        emit_json({"added": dev.to_dict(), "config": str(path), "device": info})
        return
    con = console(stderr=False)
    con.print(f"Registered {name} ({dev.address}) in {path}", soft_wrap=True)
    if info:
        cpu = info.get("cpu") or {}
        offers, reasons = _offer_text(info.get("targets") or {})
        con.print(f"  {cpu.get('model')} ({cpu.get('abi') or cpu.get('arch')}), Python {info.get('python') or '-'}; "
                  f"offers {offers} via {info.get('runner')}", soft_wrap=True)
        for r in reasons:
            con.print(f"  {r}", soft_wrap=True)


def remove(
    name: str = typer.Argument(..., help="The device's name."),
    config: Optional[str] = typer.Option(None, "--config", help=_CONFIG_HELP),
    json_: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    registry = Registry(config)
    dev = registry.remove(name)
    path = registry.save()
    if json_:
        emit_json({"removed": dev.to_dict(), "config": str(path)})
    else:
        console(stderr=False).print(f"Removed {name} ({dev.url}) from {path}", soft_wrap=True)
