# Stand-in for requests on a GPU machine without it (and without a network): d2l.torch imports it at
# module level for its downloads; the Fashion-MNIST files are already on disk there.
def __getattr__(name):
    raise ImportError(f"requests is not installed here (this is benchmarks/gpu_stubs' stand-in); requests.{name}")
