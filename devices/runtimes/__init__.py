"""Runtimes: one module per (runtime, target), each registering Runtime subclasses when imported.

A new runtime is one module here plus one line in RUNTIME_MODULES; ``base.load_all()`` imports
them (importlib on this list, so nothing else in the package has to know them).
"""

RUNTIME_MODULES = [
    "edgepipe.devices.runtimes.litert",
    "edgepipe.devices.runtimes.ort",
    "edgepipe.devices.runtimes.litert_gpu",
    "edgepipe.devices.runtimes.ort_gpu",
    "edgepipe.devices.runtimes.edgetpu",
    "edgepipe.devices.runtimes.coreml_ref.session",
]
