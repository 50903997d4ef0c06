"""Progress bars that reach whoever is watching: a widget in Jupyter, plain text in a headless run.

``tqdm.auto`` draws an ipywidget inside any Jupyter kernel, including the kernels papermill starts for
``python -m lnkit.runs``; a widget never reaches a terminal or a cluster log. The runner therefore sets
``LNKIT_PROGRESS=text`` in the environment its kernels inherit, and every lnkit loop draws its bar with
:func:`progress_bar`, which then writes plain-text tqdm to stderr; the runner reads that stream and shows
it as its status line (:mod:`lnkit.runview`). Anywhere else (a notebook, a script) this is ``tqdm.auto``.
"""

from __future__ import annotations

import os

from transformers.utils import logging as hf_logging

ENV = "LNKIT_PROGRESS"
TEXT = "text"
# One redraw a second at most: each redraw is a message from the kernel to the runner, and a line in the
# executed notebook's output until it is coalesced.
TEXT_MININTERVAL_S = 1.0


def progress_bar(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, or plain-text tqdm on stderr when ``LNKIT_PROGRESS=text``.

    >>> os.environ[ENV] = TEXT
    >>> type(progress_bar(range(3), disable=True)).__module__
    'tqdm.std'
    >>> del os.environ[ENV]
    """
    if os.environ.get(ENV) == TEXT:
        from tqdm.std import tqdm

        kwargs.setdefault("mininterval", TEXT_MININTERVAL_S)
        return tqdm(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def show_library_bars(enabled: bool) -> None:
    """Switch the bars of the libraries lnkit drives (transformers' "Loading weights", "Writing model
    shards") with a stage's ``progress`` parameter, so ``progress=False`` silences every bar; lnkit's own
    bars take ``disable=not progress``. Called by :func:`lnkit.stage.start`."""
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
