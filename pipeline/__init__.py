"""edgepipe's stages. The few names most users need, importable without TensorFlow:

    from edgepipe.pipeline import compare, load_manifest, Manifest
"""
from .errors import EdgepipeError, GateFailure, UserError
from .manifest import Artifact, Manifest, load_manifest
from .verify import compare

__all__ = ["Artifact", "EdgepipeError", "GateFailure", "Manifest", "UserError", "compare", "load_manifest"]
