"""Targets, runtimes and runners. Never imports TensorFlow."""

# Modules whose import registers Runtime subclasses. One line per new runtime.
RUNTIME_MODULES = ["runtimes.litert", "runtimes.ort", "runtimes.litert_gpu", "runtimes.ort_gpu", "runtimes.edgetpu", "runtimes.coreml_ref"]
