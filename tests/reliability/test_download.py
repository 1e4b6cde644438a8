"""Dataset downloads (issue 20 item 15): a server that never answers times out."""
from __future__ import annotations

import socket
import threading
import time

import pytest


# issue 20 item 15, guards against: a download from a server that never answers hanging forever
def test_a_download_that_never_answers_times_out(tmp_path, monkeypatch, capsys):
    import nin.data.datasets as datasets
    from nin.errors import DatasetError

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    port = srv.getsockname()[1]
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
    monkeypatch.setitem(datasets._DOWNLOADS, "mnist", ("MNIST/raw", [
        (f"http://127.0.0.1:{port}/train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "0" * 32)]))
    monkeypatch.setenv("NIN_DOWNLOAD_TIMEOUT", "1")
    t = time.monotonic()
    with pytest.raises(DatasetError, match="download into"):
        datasets.load_dataset("mnist", tmp_path, download=True)
    assert time.monotonic() - t < 30
    assert f"downloading http://127.0.0.1:{port}/" in capsys.readouterr().err
    srv.close()
