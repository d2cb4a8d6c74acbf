"""Targets, runtimes and runners. Never imports TensorFlow."""

# Modules whose import registers Runtime subclasses. One line per new runtime.
RUNTIME_MODULES = ["litert", "ort", "litert_gpu", "ort_gpu", "edgetpu", "coreml_ref"]
