"""A numpy reference interpreter for Core ML ML programs (.mlpackage), so Core ML artifacts are checked
numerically where Apple's runtime does not exist (Linux, CI).

    reader.py   the protobuf spec, the MIL program and its weight blobs, without coremltools
    ops.py      the op table (elementwise ... shape ops); nn_ops.py: convolution, pooling, constexpr
    session.py  MilModel (the interpreter), its Session, and the Core ML runtimes (reference; macOS)

The names below are the public surface (``load_program(path).predict({...})``).
"""
from edgepipe.devices.runtimes.coreml_ref.ops import supported_ops
from edgepipe.devices.runtimes.coreml_ref.reader import IOSpec, MilExecutionError, MilFormatError, UnsupportedMilOp
from edgepipe.devices.runtimes.coreml_ref.session import (CoreMLNative, CoreMLNativeGPU, CoreMLReference, MilModel,
                                                          describe, load_program, run_mlpackage)

__all__ = ["UnsupportedMilOp", "MilFormatError", "MilExecutionError", "MilModel", "IOSpec", "load_program",
           "describe", "run_mlpackage", "supported_ops", "CoreMLReference", "CoreMLNative", "CoreMLNativeGPU"]
