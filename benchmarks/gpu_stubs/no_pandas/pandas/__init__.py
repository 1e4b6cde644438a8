# Stand-in for pandas on a GPU machine without it: d2l.torch imports pandas at module level for its
# data-frame chapters; the Fashion-MNIST loader and train_ch6's step never touch it.
def __getattr__(name):
    raise ImportError(f"pandas is not installed here (this is benchmarks/gpu_stubs' stand-in); pandas.{name}")
