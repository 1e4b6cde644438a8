"""What the command line prints when pushed (issue 20): a closed pipe, a huge input, cam's --grid cap and
warnings."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from nin.cli import main


# issue 20 item 13, guards against: `nin predict ... | head -1` ending in a BrokenPipe traceback
def test_a_closed_pipe_is_not_a_traceback(finished_run, tmp_path):
    for i in range(300):
        Image.fromarray(np.full((28, 28), i % 256, np.uint8)).save(tmp_path / f"{i:03d}.png")
    p = subprocess.Popen([sys.executable, "-m", "nin", "predict", str(finished_run), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# issue 20 item 14, guards against: an input too large for memory called 'too small'
def test_summary_of_a_huge_input_talks_about_memory(capsys):
    assert main(["summary", "nin_fmnist", "--input-size", "1", "20000", "20000"]) == 0
    out = capsys.readouterr().out
    assert "smallest" not in out and "GiB of fp32 activations" in out


# issue 20 items 16-17, guards against: an unbounded --grid accepted, or cam printing a NumPy warning
def test_cam_grid_is_capped_and_cam_prints_no_warning(finished_run, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cam", str(finished_run), "--grid", "2200", "--data-dir", str(data_dir)])
    assert e.value.code == 2 and "--grid" in capsys.readouterr().err
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["cam", str(finished_run), str(img), "--out", str(tmp_path / "c.png")]) == 0
