"""llmft's messages go through the standard ``logging`` module, on the logger named ``"llmft"``.

In a notebook they should be seen without any setup, so the logger has one handler of its own that writes the bare
message to the current ``sys.stdout`` at level INFO. ``verbose=False`` in a function turns its messages into DEBUG
(hidden by default); to silence or redirect everything, configure the logger as usual::

    import logging
    logging.getLogger("llmft").setLevel(logging.WARNING)     # only warnings
    logging.getLogger("llmft").handlers.clear()              # and let the root logger's handlers decide
"""
from __future__ import annotations

import contextlib
import io
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
    from llmft.environment import is_main_process

    logger.log(logging.INFO if verbose and is_main_process() else logging.DEBUG, "%s", message)


@contextlib.contextmanager
def quiet_libraries():
    """Within the block, no per-dataset progress bars from ``datasets`` ("Truncating train dataset ...") and none
    from transformers' weight loading: for jobs that run many short steps and print one line per stage. llmft's own
    messages and training progress bars are unaffected; both switches are restored afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on = datasets.is_progress_bar_enabled()
    transformers_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def repeats_hidden(seen: set):
    """Within the block, a line printed to stdout is shown only if no block sharing ``seen`` printed it before: a
    library's identical message at each of many model loads appears once, and every new line (a warning) appears.
    The block's output is shown when it ends, also when it fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line not in seen:
                seen.add(line)
                print(line)
