"""llmft's messages go through the standard ``logging`` module, on the logger named ``"llmft"``.

In a notebook they should be seen without any setup, so the logger has one handler of its own that writes the bare
message to the current ``sys.stdout`` at level INFO. ``verbose=False`` in a function turns its messages into DEBUG
(hidden by default); to silence or redirect everything, configure the logger as usual::

    import logging
    logging.getLogger("llmft").setLevel(logging.WARNING)     # only warnings
    logging.getLogger("llmft").handlers.clear()              # and let the root logger's handlers decide
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("llmft")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (a notebook's cell output, pytest's capture)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
    logger.addHandler(_StdoutHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def say(message, verbose: bool = True) -> None:
    """Log ``message`` at INFO when ``verbose``, else at DEBUG. When several processes train together (torchrun),
    only the main one speaks at INFO, as transformers' own ``log_level_replica="warning"`` does."""
    from llmft.runtime import is_main_process

    logger.log(logging.INFO if verbose and is_main_process() else logging.DEBUG, "%s", message)
