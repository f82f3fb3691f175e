"""Console logging for dpost's entry points: its own messages at INFO, libraries from WARNING up."""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging


def configure_logging() -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and friends log every save at INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("dpost")
    root.setLevel(logging.INFO)
    if not root.handlers:
        root.addHandler(handler)
    root.propagate = False
