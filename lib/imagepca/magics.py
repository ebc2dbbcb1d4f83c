"""``%matplot plt`` in a plain IPython kernel, so one notebook source serves both kernels.

In the sparkmagic PySpark kernel ``%matplot plt`` is Livy's magic: it renders the current
pyplot figure on the remote driver and sends it back as ``image/png``. A local ``python3``
kernel has no such magic, so importing :mod:`imagepca` registers an equivalent there.
Outside IPython (Livy's own shell, scripts, Spark workers) this does nothing.
"""

from __future__ import annotations

import weakref

# The PNG each figure was last saved as (plots.save_figure): %matplot shows those bytes, the
# file the run wrote, instead of drawing the figure twice more (bbox "tight" draws twice;
# a 60-class confusion matrix takes about a second per drawing).
_SAVED_PNG: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember_png(figure, data: bytes) -> None:
    """Record that ``figure`` was saved as ``data`` (a PNG), for ``%matplot``."""
    _SAVED_PNG[figure] = data


def matplot(line: str) -> None:
    """Show the current figure of the pyplot module named in ``line`` and close it.

    Closing matters twice: the inline backend would otherwise draw the figure again at the
    end of the cell, and the next ``%matplot`` must not show a stale figure.
    """
    import io
    import sys

    from IPython.display import Image, display

    name = line.strip() or "plt"
    shell = _shell()
    pyplot = (shell.user_ns.get(name) if shell else None) or sys.modules["matplotlib.pyplot"]
    figure = pyplot.gcf()
    # PNG bytes, as Livy sends them: independent of the kernel's matplotlib backend.
    data = _SAVED_PNG.pop(figure, None)
    if data is None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        data = buffer.getvalue()
    display(Image(data=data, format="png"))
    pyplot.close(figure)


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def register_matplot_magic() -> bool:
    """Register ``%matplot`` in the running IPython kernel, unless one exists already."""
    shell = _shell()
    if shell is None or "matplot" in shell.magics_manager.magics["line"]:
        return False
    shell.register_magic_function(matplot, magic_kind="line", magic_name="matplot")
    return True
