"""Option checks bench and eval share, so that the same flag means the same thing in both."""
from __future__ import annotations

from typing import Optional

from edgepipe.pipeline.base.errors import UserError


def check_threads(threads: Optional[int]) -> Optional[int]:
    """``--threads``: None (the runtime's default) or a positive count."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"--threads must be at least 1 (got {threads})", "Leave it out for the default")
    return threads
