# Stand-in (see IPython/__init__.py): d2l calls set_matplotlib_formats only when asked to plot.
def set_matplotlib_formats(*a, **k):
    pass
