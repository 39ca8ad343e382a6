"""``vitkit serve``: a local web explorer of a run or a registered model (``pip install vitkit[serve]``).

:class:`Explorer` is the model side (decoding, prediction through the task, the interpret methods);
:func:`create_app` wraps it in a FastAPI application with its page; :func:`serve` runs that on this machine.
"""

from vitkit.serve.app import Explorer, Limits, create_app, serve, start_in_thread

__all__ = ["Explorer", "Limits", "create_app", "serve", "start_in_thread"]
