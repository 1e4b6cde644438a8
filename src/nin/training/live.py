"""Live training curves in Jupyter: one figure redrawn in place after every epoch, like d2l's Animator.

Only ``nin.api.train`` uses this, and only inside an IPython kernel.  IPython and tqdm.auto are imported
when a display starts, never at ``import nin``: the command line does not need or load them.
"""
from __future__ import annotations

import io
import sys


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, classic, VS Code, Colab): an IPython ZMQ shell.

    A terminal IPython (TerminalInteractiveShell) and plain Python are not notebooks.  IPython is
    looked up only if something already imported it, so this costs nothing outside IPython."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if callable(get) else None
    return shell is not None and any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__)


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class LiveCurves:
    """A figure of the run's curves shown once, then updated in place (a display handle) per epoch,
    with a tqdm.auto progress bar over epochs (a widget with ipywidgets, text without).

    The figure goes out as PNG bytes, so it shows whatever matplotlib backend the notebook uses and
    pyplot is never touched."""

    def __init__(self, epochs: int, title: str, done: list[dict] | None = None) -> None:
        from IPython.display import Image, display
        from tqdm.auto import tqdm

        self.epochs, self.title, self._image = epochs, title, Image
        done = list(done or [])
        self.handle = display(self._render(done), display_id=True)
        bar = dict(total=epochs, initial=len(done), desc="training", unit="epoch")
        self.bar_handle = None
        if any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__):  # tqdm.auto chose the widget
            # The widget goes out through a display handle of ours, updated with the bar: a saved
            # notebook then keeps the bar's last state as text (tqdm's own display keeps its first, 0%).
            self.bar = tqdm(**bar, display=False)
            self.bar_handle = display(self.bar.container, display_id=True)
        else:  # no ipywidgets: tqdm's text bar
            self.bar = tqdm(**bar)

    def _render(self, history: list[dict]):
        from .runfolder import curves_figure

        return self._image(data=figure_png(curves_figure(history, self.title, epochs=self.epochs)), format="png")

    def update(self, history: list[dict]) -> None:
        """The trainer's ``on_epoch``: redraw the figure with every epoch so far, advance the bar."""
        self.handle.update(self._render(history))
        row = history[-1]
        self.bar.set_postfix_str(f"loss {row['train_loss']:.3f}, test acc {row['test_acc']:.3f}", refresh=False)
        self.bar.update(row["epoch"] - self.bar.n)
        self._refresh_bar()

    def close(self) -> None:
        self.bar.close()
        self._refresh_bar()

    def _refresh_bar(self) -> None:
        if self.bar_handle is not None:
            self.bar_handle.update(self.bar.container)
