"""Helpers shared by the reliability tests."""
from __future__ import annotations

from pathlib import Path

# the fast recipe, shrunk: 256 images, width 8, one epoch (a second or two on a CPU)
TINY_ARGS = ["--limit-train", "256", "--batch-size", "64", "--eval-batch-size", "256", "--epochs", "1",
             "--warmup-epochs", "0", "--model-kwargs", '{"width": 8}', "--quiet"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), hidden files included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_error_line(err: str, command: str) -> str:
    """The CLI's stderr for a user error: exactly one line 'nin COMMAND: error: ...', no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"nin {command}: error: "), err
    return lines[0]
