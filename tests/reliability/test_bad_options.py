"""Bad options: one clear line naming the option, exit code 2 (a usage error), nothing written."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nin.cli import main

from .common import TINY_ARGS, one_error_line, snapshot

# (option(s) added to a small valid `nin train`, what the message says)
CASES = [
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr", "-0.1"], "--lr must be > 0, got -0.1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--save-every", "-1"], "--save-every must be >= 0 minutes"),
    (["--limit-train", "0"], "--limit-train must be >= 1"),
    (["--resize", "0"], "--resize must be >= 1"),
    (["--schedule", "linear"], "--schedule must be one of"),
    (["--precision", "fp8"], "--precision must be"),
    (["--model", "resnet50"], "unknown model 'resnet50'; choose one of: nin_cifar10"),
    (["--recipe", "fastest"], "unknown recipe 'fastest'; choose one of: d2l"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose from fashion-mnist"),
    (["--model", "nin_d2l", "--model-kwargs", "{}", "--resize", "32"], "smallest input it accepts is 1x67x67"),
    (["--model-kwargs", "{width: 8}"], "--model-kwargs must be a JSON object"),
    (["--model-kwargs", '{"width": 0}'], "do not fit nin_fmnist: width must be a whole number >= 1, got 0"),
    (["--model-kwargs", '{"depth": 3}'], "do not fit nin_fmnist: nin_fmnist() got an unexpected keyword argument"),
    (["--model-kwargs", '{"drop_rate": 2}'], "do not fit nin_fmnist: dropout probability"),
    (["--model", "nin_d2l"], "do not fit nin_d2l"),  # TINY_ARGS's width is nin_fmnist's argument
    (["--device", "tpu"], "--device"),
]


@pytest.mark.parametrize("extra,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_option_is_a_usage_error(tmp_path, data_dir, capsys, extra, message):
    out = tmp_path / "run"
    rc = main(["train", "--data-dir", str(data_dir), "--out", str(out), *TINY_ARGS, *extra])
    line = one_error_line(capsys.readouterr().err, "train")
    assert rc == 2, line
    assert message in line, line
    assert not out.exists()


@pytest.mark.parametrize("argv", [["train", "--epochs", "three"], ["train", "--lr"], ["train", "--bogus"],
                                  ["predict"], ["nonsense"]])
def test_malformed_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_resume_with_other_options_is_a_usage_error(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "--lr", "0.5"]) == 2
    assert "drop --lr" in one_error_line(capsys.readouterr().err, "train")


def test_output_folder_that_cannot_be_written(tmp_path, data_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out, why in [(blocker / "run", "Not a directory"), ("/proc/nin-run", "No such file or directory")]:
        assert main(["train", "--data-dir", str(data_dir), "--out", str(out), *TINY_ARGS]) == 2
        line = one_error_line(capsys.readouterr().err, "train")
        assert f"{out}: cannot write the run folder ({why})" in line, line
    assert blocker.read_text() == "not a folder"


def test_existing_run_folder_is_refused_not_overwritten(finished_run, data_dir, capsys):
    before = (finished_run / "last.ckpt").read_bytes()
    assert main(["train", "--data-dir", str(data_dir), "--out", str(finished_run), *TINY_ARGS]) == 2
    assert "already holds a run; use --resume" in one_error_line(capsys.readouterr().err, "train")
    assert (finished_run / "last.ckpt").read_bytes() == before


def test_the_real_process_exit_code_is_2(tmp_path):
    """Through `python -m nin`, as a shell sees it (the cases above call cli.main)."""
    r = subprocess.run([sys.executable, "-m", "nin", "train", "--lr", "0", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert one_error_line(r.stderr, "train") == "nin train: error: --lr must be > 0, got 0.0"
    assert not (tmp_path / "run").exists()


# issue 20 item 9, guards against: --out naming a file giving a traceback, or overwriting it
def test_out_that_is_a_file_is_one_line_and_kept(tmp_path, data_dir, finished_run, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["train", "--data-dir", str(data_dir), "--out", str(afile), *TINY_ARGS]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err, "train")
    assert main(["eval", str(finished_run), "--data-dir", str(data_dir), "--out", str(afile)]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err, "eval")
    assert afile.read_text() == "keep"


def _numeric_cases():
    """Every numeric option of every subcommand, with the values that must be refused."""
    run, img = "{run}", "{img}"
    subs = {
        "summary": (["summary", "nin_fmnist"], ["--batch-size", "--input-size"]),
        "eval": (["eval", run, "--data-dir", "{data}"], ["--batch-size", "--limit"]),
        "predict": (["predict", run, img], ["--topk", "--max-pixels"]),
        "cam": (["cam", run, img], ["--topk"]),
        "cam-grid": (["cam", run, "--data-dir", "{data}"], ["--grid"]),
        "export": (["export", run, "--out", "{tmp}/x.onnx"], ["--opset"]),
        "data": (["data", "info", "--data-dir", "{data}"], ["--seed"]),
    }
    from nin.training.recipes import TrainConfig
    import dataclasses
    train_flags = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
                   if str(f.type).split(" ")[0] in ("int", "float") and f.name != "recipe"]
    subs["train"] = (["train", "--data-dir", "{data}", "--out", "{tmp}/newrun", *TINY_ARGS], train_flags)
    zero_ok = {"--crop-padding", "--val-split", "--seed", "--save-every", "--weight-decay", "--momentum",
               "--label-smoothing", "--ema", "--warmup-epochs", "--erase", "--workers", "--max-bad",
               "--clip-grad-norm", "--min-steps-per-epoch", "--muon-momentum"}
    cases = []
    for name, (argv, flags) in subs.items():
        for flag in flags:
            for value in ("0", "-1", "nan", "1e400", "99999999999999999999"):
                if value == "0" and flag in zero_ok:
                    continue
                cases.append((name, argv, flag, value))
    return cases


# issue 20 item 11, guards against: a numeric option (0, -1, nan, huge) reaching the code unchecked
@pytest.mark.parametrize("name,argv,flag,value", _numeric_cases(),
                         ids=[f"{c[0]} {c[2]} {c[3]}" for c in _numeric_cases()])
def test_every_numeric_option_is_validated(tmp_path, finished_run, data_dir, capsys, name, argv, flag, value):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    fill = {"{run}": str(finished_run), "{img}": str(img), "{data}": str(data_dir), "{tmp}": str(tmp_path)}
    argv = [fill.get(a, a.replace("{tmp}", str(tmp_path))) for a in argv]
    extra = [flag, value, value, value] if flag == "--input-size" else [flag, value]
    before = snapshot(finished_run)
    try:
        code = main([*argv, *extra])
    except SystemExit as e:  # argparse: refused while parsing
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.strip()]) == 1, err
    assert flag in err or flag.lstrip("-").replace("-", "_") in err, err
    assert snapshot(finished_run) == before
    assert not (tmp_path / "newrun").exists()


# issue 20 item 12, guards against: an --opset the exporter cannot write accepted, or the file holding another
def test_opset_is_refused_below_18_and_is_the_files_own(finished_run, tmp_path, capsys):
    import onnx

    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as e:
        main(["export", str(finished_run), "--opset", "7", "--out", str(out)])
    assert e.value.code == 2 and "--opset: must be >= 18" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(finished_run), "--opset", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    model = onnx.load(out)
    real = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert real == 20 and "ONNX opset 20" in printed.out and "Traceback" not in printed.err
