# Stand-in for IPython on the GPU machine (not installed there): d2l.torch imports `display` at module
# level and uses it only to draw plots in notebooks; the training loop and DataLoader never touch it.
import types
display = types.SimpleNamespace(display=lambda *a, **k: None, clear_output=lambda *a, **k: None,
                                set_matplotlib_formats=lambda *a, **k: None)


def get_ipython():  # matplotlib asks this when it switches backend: not in a notebook
    return None


version_info = (9, 0)  # matplotlib skips its IPython GUI-backend fix-ups for IPython >= 8.24
