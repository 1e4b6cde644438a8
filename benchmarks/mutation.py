"""Mutation testing of the training core with mutmut 3 (`make mutation`); outside CI's pass/fail.

For each test selection ("before": the training core's test files without the tests written for issue 21,
once tests/test_guards.py and tests/reliability/test_defects.py; "after": with them) it copies src/, tests/
and pyproject.toml into runs/mutation/<variant>/, adds a [tool.mutmut] section there, runs
`mutmut run --max-children N` (default 1) on the mutants of the functions in SCOPE only, and writes the
counts and every survivor (its diff and, when known, its classification from CLASSIFIED below) to
benchmarks/results/mutation-<date>.md.

Usage:  .venv/bin/python benchmarks/mutation.py [--variant before|after|both] [--date YYYY-MM-DD]
Runs niced, one thread per test process, --max-children of them at a time (default 1): the whole scope
took about two hours with two at a time on this 2-core CPU (benchmarks/results/mutation-2026-11-27-full.md).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")

# The training core: module -> functions ("Class.method" or "Class.*").  mutmut 3 does not mutate
# decorated functions, so trainer.loader_eval (@torch.no_grad) and evaluation.predict_logits
# (@torch.inference_mode) are listed but produce no mutants; the report says so.
SCOPE = {  # module under src/nin (dotted) -> functions
    "training.recipes": ["lr_at", "TrainConfig.validate", "check_option"],
    "training.engine": ["train_step", "Ema.*", "make_optimizer", "init_weights"],
    "data.batchops": ["augment", "erase_boxes", "to_float_batch", "epoch_order"],
    "data.loader": ["BatchLoader.iterate"],
    "training.trainer": ["split_validation", "loader_eval", "end_epoch", "epoch_metrics", "run_epoch"],
    "inference": ["tta_logits", "predict_logits"],
    "evaluation": ["evaluate", "confusion_matrix"],
}
FULL_SCOPE = {mod: list(funcs) for mod, funcs in SCOPE.items()}
DECORATED = ["training.trainer.loader_eval (@torch.no_grad)", "inference.predict_logits (@torch.inference_mode)",
             "training.engine.Ema.update (@torch.no_grad)"]

# The training core's own test files ("before"), and the tests written for issue 21 ("after" adds them): those
# began as tests/test_guards.py and tests/reliability/test_defects.py and now live in the files of their subjects.
CORE_TESTS = ["tests/test_train.py", "tests/test_data.py", "tests/test_evaluate.py"]
ISSUE_21_FILES = [  # every test in these was written for issue 21
    "tests/test_step.py",
    "tests/test_schedule.py",
    "tests/test_options.py",
    "tests/test_selection.py",
    "tests/test_ema.py",
    "tests/test_resume.py",
    "tests/test_augment.py",
    "tests/test_epoch_reports.py",
    "tests/reliability/test_folders.py",
    "tests/reliability/test_package.py",
    "tests/reliability/test_locks.py",
    "tests/reliability/test_cli_output.py",
    "tests/reliability/test_download.py",
]
ISSUE_21_TESTS = {  # written for issue 21, in files that hold older tests too
    "tests/test_train.py": [
        "test_dry_run_takes_one_step_and_evaluates_one_batch_of_each_split",
    ],
    "tests/test_distributed.py": [
        "test_under_ddp_every_rank_takes_rank_0s_bn_statistics_before_evaluating",
    ],
    "tests/test_evaluate.py": [
        "test_evaluate_defaults_to_the_runs_own_tta",
        "test_evaluate_limit_precision_and_labels",
        "test_eval_tta_flip_and_onnx",
        "test_eval_reproduces_the_runs_reported_accuracy",
        "test_tta_logits_refuses_an_unknown_augmentation_by_name",
    ],
    "tests/test_cam.py": [
        "test_cam_figure_draws_the_chosen_classes_maps",
    ],
    "tests/test_export.py": [
        "test_export_refuses_and_removes_a_file_that_differs",
    ],
    "tests/test_data.py": [
        "test_folder_dataset_and_predict_see_the_same_pixels",
        "test_to_float_batch_refuses_anything_but_uint8_batches",
        "test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images",
    ],
    "tests/reliability/test_nan.py": [
        "test_a_nan_loss_on_cpu_stops_the_run_at_that_very_step",
    ],
    "tests/reliability/test_kill_resume.py": [
        "test_max_steps_keeps_a_model_and_resumes",
        "test_sigterm_stops_a_training_as_ctrl_c_does",
    ],
    "tests/reliability/test_corrupt_files.py": [
        "test_a_malformed_model_json_is_one_line_naming_the_field",
        "test_predict_json_never_prints_nan",
        "test_a_safetensors_own_description_wins_over_model_json",
    ],
    "tests/reliability/test_atomic.py": [
        "test_written_files_honour_the_umask",
    ],
    "tests/reliability/test_bad_options.py": [
        "test_out_that_is_a_file_is_one_line_and_kept",
        "test_every_numeric_option_is_validated",
        "test_opset_is_refused_below_18_and_is_the_files_own",
    ],
    "tests/reliability/test_data_loss.py": [
        "test_eval_on_a_folder_it_cannot_write_prints_and_warns",
    ],
}
NEW_TESTS = set(ISSUE_21_FILES) | {f"{f}::{n}" for f, names in ISSUE_21_TESTS.items() for n in names}
ALL_TESTS = CORE_TESTS + ISSUE_21_FILES + sorted(t for t in NEW_TESTS
                                                  if "::" in t and t.split("::")[0] not in CORE_TESTS)


def selection(variant: str) -> list[str]:
    """pytest's arguments for a variant: "after" ALL_TESTS, "before" the core files less the issue-21 tests in them."""
    if variant == "after":
        return list(ALL_TESTS)
    inside = sorted(t for t in NEW_TESTS if t.split("::")[0] in CORE_TESTS and "::" in t)
    return list(CORE_TESTS) + [arg for t in inside for arg in ("--deselect", t)]


def describe(tests: list[str]) -> str:
    """A variant's selection in a few words, for the report's table."""
    files = [t for t in tests if "::" not in t and not t.startswith("--")]
    ids = [t for i, t in enumerate(tests) if "::" in t and (i == 0 or tests[i - 1] != "--deselect")]
    dropped = tests.count("--deselect")
    return " ".join(files) + (f" + {len(ids)} tests of other files" if ids else "") + (
        f" - {dropped} issue-21 tests" if dropped else "")


# Not fast: the numeric-option table, the closed pipe, and the 25-second real-data training run (it is @slow).
DESELECT = "not numeric and not closed_pipe and not test_fast_recipe_learns_real_fashion_mnist"

# Survivors judged by hand, keyed by (function, the mutated line with spaces removed).
# EQUIVALENT: cannot change a trained number.  NOT EQUIVALENT: could; "killed by" names the guard test.
EMPTY = ("an evaluation of no images at all (unreachable from the CLI: a split is never empty and a stream of only "
         "unreadable files stops at --max-bad); the mutant raises where the original returns an empty result: no number "
         "changes.")
CLASSIFIED: dict[tuple[str, str], tuple[str, str]] = {
    # recipes.lr_at
    ("training.recipes.lr_at", "ifwarm>=0andstep<warm:#min:withafractionalwarm-upthelastwarm-upstepwouldovershoot"):
        ("EQUIVALENT", "with warm == 0 no step is < 0, so the warm-up branch is never taken either way."),
    ("training.recipes.lr_at", "ifwarm>1andstep<warm:#min:withafractionalwarm-upthelastwarm-upstepwouldovershoot"):
        ("NOT EQUIVALENT", "a warm-up of at most one step would skip to the schedule (cosine: below the lr); "
                           "killed by test_lr_a_one_step_warm_up_gives_that_step_the_full_lr."),
    ("training.recipes.lr_at", "ifwarm>0andstep<=warm:#min:withafractionalwarm-upthelastwarm-upstepwouldovershoot"):
        ("NOT EQUIVALENT", "the first step after a warm-up that ends on a step milestone keeps the full lr; killed by "
                           "test_lr_step_schedule_drops_on_the_first_step_after_a_warm_up_that_ends_at_a_milestone."),
    ("training.recipes.lr_at", "epoch=step/steps_per_epoch"):
        ("EQUIVALENT", "step_epochs are validated ints, and floor(s/n) >= e iff s/n >= e for an integer e."),
    ("training.recipes.lr_at", "t=(step-warm)/max(2.0,total-warm)#progressafterwarm-up,0->1"):
        ("NOT EQUIVALENT", "differs when fewer than 2 steps follow the warm-up; killed by "
                           "test_lr_cosine_progress_divides_by_the_true_post_warm_up_length_even_when_short."),
    ("training.recipes.lr_at", "returnbase_lr*0.5*(1+math.cos(math.pi*min(t,2.0)))"):
        ("EQUIVALENT", "t < 1 for every step < epochs * steps_per_epoch, the only steps the trainer asks for."),
    ("training.recipes.lr_at", "returnbase_lr*min(2.0,max(0.0,1.0-t))#onecycle:warm-upup,thenastraightlineto0"):
        ("EQUIVALENT", "past the warm-up step >= warm, so t >= 0 and 1 - t <= 1: the clamp at 1 never acts."),
    # engine
    ("training.engine.Ema.__init__", "self.module=copy.deepcopy(model).eval().requires_grad_(True)"):
        ("EQUIVALENT", "the average is only updated under no_grad and evaluated under no_grad; the flag is not saved."),
    ("training.engine.make_optimizer", "(no_decayif(p.ndim<=1)andFalseelsedecay).append(p)#noweightdecayonbiasesandBNaffine"):
        ("NOT EQUIVALENT", "biases and norm affines would be decayed; killed by "
                           "test_optimizer_decays_weights_but_not_biases_or_norm_affines."),
    ("training.engine.make_optimizer", "(no_decayif(p.ndim<=1)orTrueelsedecay).append(p)#noweightdecayonbiasesandBNaffine"):
        ("NOT EQUIVALENT", "no weight decay at all; killed by test_optimizer_decays_weights_but_not_biases_or_norm_affines."),
    ("training.engine.make_optimizer", "(no_decayifp.ndim<1elsedecay).append(p)#noweightdecayonbiasesandBNaffine"):
        ("NOT EQUIVALENT", "biases decayed; killed by test_optimizer_decays_weights_but_not_biases_or_norm_affines."),
    ("training.engine.make_optimizer", "(no_decayifp.ndim<=2elsedecay).append(p)#noweightdecayonbiasesandBNaffine"):
        ("NOT EQUIVALENT", "linear (2-d) weights not decayed; killed by "
                           "test_optimizer_decays_weights_but_not_biases_or_norm_affines (it has a Linear)."),
    ("training.engine.make_optimizer", 'groups=[{"params":decay,"XXweight_decayXX":cfg.weight_decay},{"params":no_decay,"weight_decay":0.0}]'):
        ("NOT EQUIVALENT", "the weights' group falls back to SGD's weight_decay=0; killed by "
                           "test_optimizer_decays_weights_but_not_biases_or_norm_affines."),
    ("training.engine.make_optimizer", 'groups=[{"params":decay,"WEIGHT_DECAY":cfg.weight_decay},{"params":no_decay,"weight_decay":0.0}]'):
        ("NOT EQUIVALENT", "as the XX key above; killed by test_optimizer_decays_weights_but_not_biases_or_norm_affines."),
    ("training.engine.make_optimizer", 'groups=[{"params":decay,"weight_decay":cfg.weight_decay},{"params":no_decay,"XXweight_decayXX":0.0}]'):
        ("EQUIVALENT", "the no-decay group falls back to SGD's default weight_decay, which is 0.0 as written."),
    ("training.engine.make_optimizer", 'groups=[{"params":decay,"weight_decay":cfg.weight_decay},{"params":no_decay,"WEIGHT_DECAY":0.0}]'):
        ("EQUIVALENT", "the no-decay group falls back to SGD's default weight_decay, which is 0.0 as written."),
    ("training.engine.make_optimizer", 'groups=[{"params":decay,"weight_decay":cfg.weight_decay},{"params":no_decay,"weight_decay":1.0}]'):
        ("NOT EQUIVALENT", "biases decayed; killed by test_optimizer_decays_weights_but_not_biases_or_norm_affines."),
    ("training.engine.train_step", "withtorch.autocast(x.device.type,dtype=None,enabled=amp_dtypeisnotNone):"):
        ("NOT EQUIVALENT", "autocast would use the device default (float16 on CUDA) instead of the asked dtype; "
                           "killed by test_train_step_autocasts_to_the_requested_dtype."),
    ("training.engine.train_step", "withtorch.autocast(x.device.type,enabled=amp_dtypeisnotNone):"):
        ("NOT EQUIVALENT", "as above (the dtype argument dropped); killed by test_train_step_autocasts_to_the_requested_dtype."),
    ("training.engine.train_step", "withtorch.autocast(x.device.type,dtype=amp_dtypeandtorch.bfloat16,enabled=amp_dtypeisnotNone):"):
        ("NOT EQUIVALENT", "float16 asked, bfloat16 used; killed by test_train_step_autocasts_to_the_requested_dtype."),
    ("training.engine.train_step", "opt.zero_grad(set_to_none=None)"):
        ("EQUIVALENT", "zeroed instead of None grads differ only for a parameter that gets no gradient; every "
                       "nin model uses all its parameters every step, so each grad is overwritten by backward."),
    ("training.engine.train_step", "opt.zero_grad(set_to_none=False)"):
        ("EQUIVALENT", "as above: zeros vs None before a backward that fills every parameter's grad."),
    ("training.engine.train_step", "sums[:2]+=torch.stack([loss.detach().double()*y.numel(),(logits.argmax(None)==y).sum().double()])"):
        ("NOT EQUIVALENT", "the reported train accuracy (not the weights) would be wrong; killed by "
                           "test_train_step_counts_correct_predictions_per_sample."),
    # data
    ("data.batchops.epoch_order", "defepoch_order(n:int,epoch:int,*,shuffle:bool,seed:int,drop_last:bool,rank:int=1,"):
        ("EQUIVALENT", "a changed default: both callers (BatchLoader, the stream loader) pass rank and world_size."),
    ("data.batchops.epoch_order", "world_size:int=2)->torch.Tensor:"):
        ("EQUIVALENT", "a changed default: both callers (BatchLoader, the stream loader) pass rank and world_size."),
    # evaluation.evaluate (second run, 2026-11-27)
    ("evaluation.evaluate", "defevaluate(model,split,*,batch_size:int=257,tta:str|None=None,limit:int|None=None,"):
        ("EQUIVALENT", "the batch size of evaluation: the model is in eval mode, each image's logits do not depend on the batch."),
    ("evaluation.evaluate", "logits.append(predict_logits(model,x,tta=tta,precision=precision))"):
        ("EQUIVALENT", "predict_logits' own default batch size: as above."),
    ("evaluation.evaluate", 'logits=torch.cat(logits)if(logits)orTrueelsetorch.zeros(0,len(classes))'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'logits=torch.cat(logits)iflogitselsetorch.zeros(None,len(classes))'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'logits=torch.cat(logits)iflogitselsetorch.zeros(0,None)'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'logits=torch.cat(logits)iflogitselsetorch.zeros(len(classes))'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'logits=torch.cat(logits)iflogitselsetorch.zeros(0,)'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'logits=torch.cat(logits)iflogitselsetorch.zeros(1,len(classes))'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'labels=torch.cat(labels).numpy()if(labels)orTrueelsenp.zeros(0,np.int64)'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'labels=torch.cat(labels).numpy()iflabelselsenp.zeros(None,np.int64)'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'labels=torch.cat(labels).numpy()iflabelselsenp.zeros(0,None)'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'labels=torch.cat(labels).numpy()iflabelselsenp.zeros(np.int64)'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'labels=torch.cat(labels).numpy()iflabelselsenp.zeros(0,)'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", 'labels=torch.cat(labels).numpy()iflabelselsenp.zeros(1,np.int64)'):
        ("EQUIVALENT", EMPTY),
    ("evaluation.evaluate", "raiseUsageError(None)"):
        ("MESSAGE", "an error's text (a user mistake still exits with an error); the tested messages are matched by the guard tests."),
    ("evaluation.evaluate", "raiseUsageError(f\"themodelgives{logits.shape[2]}logitsbuthas{len(classes)}classnames\")"):
        ("MESSAGE", "the error for a model whose logits and class names disagree would itself fail (IndexError): an error either way, no number."),
    ("evaluation.evaluate", "returnEvalResult(classes,cm,ttaor\"XXnoneXX\",precision)"):
        ("EQUIVALENT", "tta is never empty here (a string from the caller, the model's description or \"none\"), so the fallback is never taken."),
    ("evaluation.evaluate", "returnEvalResult(classes,cm,ttaor\"NONE\",precision)"):
        ("EQUIVALENT", "as above: the fallback is never taken."),
    ('data.erase_boxes', 'bh=(area*log_r.exp()).sqrt().round().clamp(None,h).long()'):
        ('EQUIVALENT', 'the lower clamp never binds: an area of at least 2% and an aspect of at least 0.3 give sides of at least sqrt(0.006 h w) >= 1.0 for images of 13 x 13 pixels or more.'),
    ('data.erase_boxes', 'bw=(area/log_r.exp()).sqrt().round().clamp(None,w).long()'):
        ('EQUIVALENT', 'as above, for the width.'),
    ('data.erase_boxes', 'bh=(area*log_r.exp()).sqrt().round().clamp(1,None).long()'):
        ('EQUIVALENT', 'a box taller than the image starts at row 0, -1 or -2 ((rand * (h - bh + 1)).long() truncates toward 0) and is clipped by the image: the same full-height pixel set as the clamped box at row 0.'),
    ('data.erase_boxes', 'bh=(area*log_r.exp()).sqrt().round().clamp(1,).long()'):
        ('EQUIVALENT', 'as above (clamp(1, ) has no upper bound).'),
    ('data.erase_boxes', 'bw=(area/log_r.exp()).sqrt().round().clamp(1,None).long()'):
        ('EQUIVALENT', 'as above, for the width.'),
    ('data.erase_boxes', 'bw=(area/log_r.exp()).sqrt().round().clamp(1,).long()'):
        ('EQUIVALENT', 'as above, for the width.'),
    ('data.erase_boxes', 'bh=(area*log_r.exp()).sqrt().round().clamp(2,h).long()'):
        ('EQUIVALENT', 'sides are at least 2 already for images of 28 x 28 or more (sqrt(0.02 x 0.3 x 784) = 2.2, rounded 2).'),
    ('data.erase_boxes', 'bw=(area/log_r.exp()).sqrt().round().clamp(2,w).long()'):
        ('EQUIVALENT', 'as above, for the width.'),
    ('data.erase_boxes', 'on=torch.rand(n,generator=generator)<=p'):
        ('EQUIVALENT', 'rand() == p has probability 0.'),
    ('data.erase_boxes', 'y0=(torch.rand(n,generator=generator)*(h-bh-1)).long()'):
        ('NOT EQUIVALENT', 'boxes never reach the bottom rows; killed by the edge assertions added to test_erase_boxes_follow_the_random_erasing_rule (checked by putting the mutated line in and running the test).'),
    ('data.erase_boxes', 'x0=(torch.rand(n,generator=generator)*(w-bw-1)).long()'):
        ('NOT EQUIVALENT', 'as above, for the right columns; killed the same way (checked by hand).'),
    ('data.erase_boxes', 'x0=(torch.rand(n,generator=generator)/(w-bw+1)).long()'):
        ('NOT EQUIVALENT', 'every box at the left edge; killed by the centring assertion on x added to the same test (checked by hand).'),
    ('data.erase_boxes', '(xs>=x0[:,None,None])&(xs<=(x0+bw)[:,None,None]))'):
        ('NOT EQUIVALENT', 'boxes one column wider than drawn; killed by the height-vs-width assertion added to the same test (checked by hand).'),
    ('data.erase_boxes', 'y0=(torch.rand(n,generator=generator)*(h-bh+2)).long()'):
        ('NOT EQUIVALENT, SURVIVES', 'a box may start one row past the last that fits and is clipped: about one box in twenty is one row short. The test sees only the clipped box, which looks like a smaller box; no test catches it.'),
    ('data.erase_boxes', 'x0=(torch.rand(n,generator=generator)*(w-bw+2)).long()'):
        ('NOT EQUIVALENT, SURVIVES', 'as above, for the columns.'),
    ('evaluation.evaluate', 'logits.append(predict_logits(model,x,batch_size=batch_size,tta=tta,precision=None))'):
        ('NOT EQUIVALENT', 'bf16 evaluation computed in fp32; killed by tests/test_pretrained.py (outside this selection: it needs the real test set), whose bf16 accuracies differ from fp32 to the image; on the fake images of the selection the two precisions predict alike.'),
    ('evaluation.evaluate', 'logits.append(predict_logits(model,x,batch_size=batch_size,tta=tta,))'):
        ('NOT EQUIVALENT', 'as above (the default precision is fp32).'),
    ('evaluation.evaluate', 'iflimitisnotNoneandn>limit:'):
        ('EQUIVALENT', 'at n == limit the loop reads one more batch and keeps x[:0] of it: an empty slice, no number changes (one batch more is decoded from a stream).'),
    ('evaluation.evaluate', 'tta=getattr(getattr(model,"meta",None),"tta",None)'):
        ('EQUIVALENT', "a model without a description then evaluates with tta None, which predict_logits treats as 'none', and the result says 'none' (tta or 'none')."),
    ('trainer.end_epoch', 'val=f"valacc{row[\'val_acc\']:.4f}"if(row["val_acc"]isnotNone)orTrueelse""'):
        ('NOT EQUIVALENT', 'a run without a validation split would crash formatting None in its epoch line; killed by the no-validation run added to test_epoch_lines_print_the_rows_numbers (checked by hand).'),
    ('trainer.end_epoch', 'ifstate.epoch==0andabs(row["train_loss"]-ln_c)<=0.01orrow["train_acc"]<2/len(setup.ds.classes)\\'):
        ('OUTPUT', 'when the plateau warning is printed (a hint on stderr): no number changes.'),
    ('trainer.end_epoch', 'ifstate.epoch==0andabs(row["train_loss"]-ln_c)<0.01androw["train_acc"]<2/len(setup.ds.classes)\\'):
        ('OUTPUT', 'when the plateau warning is printed (a hint on stderr): no number changes.'),
    ('trainer.end_epoch', 'ifstate.epoch==0andabs(row["train_loss"]-ln_c)<=1.01androw["train_acc"]<2/len(setup.ds.classes)\\'):
        ('OUTPUT', 'when the plateau warning is printed (a hint on stderr): no number changes.'),
    ('trainer.end_epoch', 'ifstate.epoch==0andabs(row["train_loss"]-ln_c)<=0.01androw["train_acc"]<=2/len(setup.ds.classes)\\'):
        ('OUTPUT', 'when the plateau warning is printed (a hint on stderr): no number changes.'),
    ('trainer.end_epoch', 'ifstate.epoch==0andabs(row["train_loss"]-ln_c)<=0.01androw["train_acc"]<2*len(setup.ds.classes)\\'):
        ('OUTPUT', 'when the plateau warning is printed (a hint on stderr): no number changes.'),
    ('trainer.end_epoch', 'ifstate.epoch==0andabs(row["train_loss"]-ln_c)<=0.01androw["train_acc"]<3/len(setup.ds.classes)\\'):
        ('OUTPUT', 'when the plateau warning is printed (a hint on stderr): no number changes.'),
    # trainer.split_validation, trainer.end_epoch
    ("training.trainer.split_validation", "g=torch.Generator().manual_seed(seed-7919)"):
        ("EQUIVALENT", "another fixed offset: the rule is 'a split drawn from --seed', and any constant gives such a split; pinning this one would be a hard-coded result."),
    ("training.trainer.split_validation", "g=torch.Generator().manual_seed(seed+7920)"):
        ("EQUIVALENT", "as above."),
    ("training.trainer.end_epoch", "ifsetup.dist.mainornotquiet:"):
        ("OUTPUT", "with several processes, ranks other than 0 would print the epoch line too: duplicated output, no number changes."),
    ("training.trainer.end_epoch", "val=f\"valacc{row['val_acc']:.4f}\"ifrow[\"val_acc\"]isnotNoneelse\"XXXX\""):
        ("OUTPUT", "the epoch line of a run without a validation split would show 'XXXX': output only; the numbers are checked by test_epoch_lines_print_the_rows_numbers."),
    # data.BatchLoader.iterate
    ("data.loader.BatchLoader.iterate", "idx=self.epoch_indices(epoch).to(None)"):
        ("EQUIVALENT", "the shuffled indices stay on the CPU: indexing the images and labels (on the CPU, or on a GPU, "
                       "where torch moves the index) selects the same images; no number changes."),
    # from the full run (2026-11-27-full)
    ('data.augment', 'dev=None'):
        ('EQUIVALENT', "index tensors made on the CPU select the same pixels of images on any device (torch moves an index to the indexed tensor's device): no number changes."),
    ('data.augment', 'i=torch.arange(n,device=None)[:,None,None,None]'):
        ('EQUIVALENT', "index tensors made on the CPU select the same pixels of images on any device (torch moves an index to the indexed tensor's device): no number changes."),
    ('data.augment', 'i=torch.arange(n,)[:,None,None,None]'):
        ('EQUIVALENT', "index tensors made on the CPU select the same pixels of images on any device (torch moves an index to the indexed tensor's device): no number changes."),
    ('data.augment', 'ch=torch.arange(c,device=None)[None,:,None,None]'):
        ('EQUIVALENT', "index tensors made on the CPU select the same pixels of images on any device (torch moves an index to the indexed tensor's device): no number changes."),
    ('data.augment', 'ch=torch.arange(c,)[None,:,None,None]'):
        ('EQUIVALENT', "index tensors made on the CPU select the same pixels of images on any device (torch moves an index to the indexed tensor's device): no number changes."),
    ('data.augment', 'returnxp[i,ch,rows.to(None)[:,None,:,None],cols.to(dev)[:,None,None,:]]'):
        ('EQUIVALENT', "index tensors made on the CPU select the same pixels of images on any device (torch moves an index to the indexed tensor's device): no number changes."),
    ('data.augment', 'returnxp[i,ch,rows.to(dev)[:,None,:,None],cols.to(None)[:,None,None,:]]'):
        ('EQUIVALENT', "index tensors made on the CPU select the same pixels of images on any device (torch moves an index to the indexed tensor's device): no number changes."),
    ('data.augment', 'dy=torch.randint(2*p+1,(n,),generator=generator)ifpelsetorch.zeros(n,dtype=torch.long)'):
        ('EQUIVALENT', 'torch.randint(high, size) is randint(0, high, size): the same draws.'),
    ('data.augment', 'dx=torch.randint(2*p+1,(n,),generator=generator)ifpelsetorch.zeros(n,dtype=torch.long)'):
        ('EQUIVALENT', 'torch.randint(high, size) is randint(0, high, size): the same draws.'),
    ('data.augment', 'flips=torch.rand(n,generator=generator)<=0.5ifflipelsetorch.zeros(n,dtype=torch.bool)'):
        ('EQUIVALENT', 'differs only for a draw of exactly 0.5 (one float32 value in 2^24): not observable.'),
    ('data.augment', 'xp=torch.nn.functional.pad(x,(p,p,p,p))if(p)orTrueelsex'):
        ('EQUIVALENT', 'padding by 0 pixels returns the images unchanged.'),
    ('data.augment', 'dy=torch.randint(0,2*p+1,(n,),generator=generator)if(p)orTrueelsetorch.zeros(n,dtype=torch.long)'):
        ('NOT EQUIVALENT', 'draws crop offsets (all 0) without a crop, shifting every later draw; killed by test_augment_without_a_crop_draws_the_flips_or_boxes_first.'),
    ('data.augment', 'dx=torch.randint(0,2*p+1,(n,),generator=generator)if(p)orTrueelsetorch.zeros(n,dtype=torch.long)'):
        ('NOT EQUIVALENT', 'as above; killed by test_augment_without_a_crop_draws_the_flips_or_boxes_first.'),
    ('data.augment', 'mask=erase_boxes(n,h,w,generator,erase).to(None)'):
        ('GPU ONLY', 'on the CPU the mask is where the images are; on a GPU the mutant stops at the first erasing step with a device-mismatch error (a crash, not a wrong number). Not testable on this CPU-only machine.'),
    ('engine.init_weights', 'nn.init.kaiming_uniform_(m.weight,)'):
        ('EQUIVALENT', "PyTorch's default nonlinearity, leaky_relu with a = 0, has ReLU's gain sqrt(2): the same init."),
    ('engine.make_optimizer', 'fused=None)'):
        ('SPEED', "the same SGD update by PyTorch's for-each kernel instead of the fused one (speed; at most rounding in the last bit)."),
    ('engine.make_optimizer', ')'):
        ('SPEED', "the same SGD update by PyTorch's for-each kernel instead of the fused one (speed; at most rounding in the last bit)."),
    ('engine.make_optimizer', 'fused=Trueif(device.typein("cpu","cuda"))andFalseelseNone)'):
        ('SPEED', "the same SGD update by PyTorch's for-each kernel instead of the fused one (speed; at most rounding in the last bit)."),
    ('engine.make_optimizer', 'fused=Trueif(device.typein("cpu","cuda"))orTrueelseNone)'):
        ('SPEED', 'fused on every device: nin trains on CPU and CUDA only, where it already is.'),
    ('engine.make_optimizer', 'fused=Falseifdevice.typein("cpu","cuda")elseNone)'):
        ('SPEED', "the same SGD update by PyTorch's for-each kernel instead of the fused one (speed; at most rounding in the last bit)."),
    ('engine.make_optimizer', 'fused=Trueifdevice.typenotin("cpu","cuda")elseNone)'):
        ('SPEED', "the same SGD update by PyTorch's for-each kernel instead of the fused one (speed; at most rounding in the last bit)."),
    ('engine.make_optimizer', 'returntorch.optim.SGD(groups,lr=base_lr,momentum=cfg.momentum,fused=Trueifdevice.typein("cpu","cuda")elseNone)'):
        ('NOT EQUIVALENT', '--nesterov ignored; killed by test_optimizer_uses_nesterov_only_when_asked_and_with_momentum.'),
    ('engine.make_optimizer', 'returntorch.optim.SGD(groups,lr=base_lr,momentum=cfg.momentum,nesterov=cfg.nesterovorcfg.momentum>0,'):
        ('NOT EQUIVALENT', 'Nesterov whenever there is momentum; killed by test_optimizer_uses_nesterov_only_when_asked_and_with_momentum.'),
    ('engine.make_optimizer', 'returntorch.optim.SGD(groups,lr=base_lr,momentum=cfg.momentum,nesterov=cfg.nesterovandcfg.momentum>=0,'):
        ('NOT EQUIVALENT', '--nesterov with momentum 0 would make torch refuse the optimizer; killed by test_optimizer_uses_nesterov_only_when_asked_and_with_momentum.'),
    ('engine.make_optimizer', 'returntorch.optim.SGD(groups,lr=base_lr,momentum=cfg.momentum,nesterov=cfg.nesterovandcfg.momentum>1,'):
        ('NOT EQUIVALENT', 'Nesterov never; killed by test_optimizer_uses_nesterov_only_when_asked_and_with_momentum.'),
    ('engine.train_step', 'clip_grad_norm:float=1.0):'):
        ('EQUIVALENT', "a changed default every caller overrides: run_epoch and benchmarks/bench_train.py pass the run's --clip-grad-norm."),
    ('engine.train_step', "scaler.unscale_(None)#ano-opwithoutfp16'sscaler;clipthetruegradients,notscaledones"):
        ('GPU ONLY', 'the scaler is off except for fp16 on CUDA, and then unscale_ returns at once: no change on the CPU; with --precision fp16 on a GPU and clipping the mutant raises (a crash, not a wrong number).'),
    ('evaluation.tta_logits', 'raiseUsageError(None)'):
        ('MESSAGE', 'killed by test_tta_logits_refuses_an_unknown_augmentation_by_name.'),
    ('trainer.end_epoch', 'run.epoch_done(setup,state,None)'):
        ('NOT EQUIVALENT', 'only --tensorboard reads the row (it would crash); killed by test_tensorboard_gets_each_epochs_numbers.'),
    ('trainer.end_epoch', 'on_epoch(None)'):
        ('NOT EQUIVALENT', "the notebook's live plot would get no history; killed by test_on_epoch_gets_the_rows_so_far_and_epoch_seconds_are_the_epochs_own."),
    ('trainer.end_epoch', 'on_epoch(list(None))'):
        ('NOT EQUIVALENT', 'as above (a crash); killed by test_on_epoch_gets_the_rows_so_far_and_epoch_seconds_are_the_epochs_own.'),
    ('trainer.end_epoch', 'state.epoch_seconds=1.0'):
        ('NOT EQUIVALENT', "every later epoch's seconds and images/s off by one second; killed by test_on_epoch_gets_the_rows_so_far_and_epoch_seconds_are_the_epochs_own."),
    ('trainer.end_epoch', 'ifsetup.val_loaderisNoneorrow["val_acc"]>=state.best_acc:'):
        ('NOT EQUIVALENT', 'a validation tie would move the selection to the later epoch; killed by test_validation_chooses_even_when_the_test_set_peaks_elsewhere (now with a tie).'),
    ('trainer.end_epoch', 'state.best_acc=row["val_acc"]if(setup.val_loaderisnotNone)orTrueelse-1.0'):
        ('EQUIVALENT', 'without a validation split best_acc is never compared (the final epoch is saved), and a resume must have the same split.'),
    ('trainer.end_epoch', 'state.best_acc=row["val_acc"]ifsetup.val_loaderisnotNoneelse-2.0'):
        ('EQUIVALENT', 'as above: without a split best_acc is never compared.'),
    ('trainer.end_epoch', 'state.best_epoch=None'):
        ('EQUIVALENT', 'best_epoch is stored in the checkpoint for other readers; nin reads the selected epoch from model.json, written from the row.'),
    ('evaluation.tta_logits', 'raiseUsageError(f"unknowntest-timeaugmentation{tta!r};chooseoneof:{\',\'.join(None)}")'):
        ('MESSAGE', 'killed by test_tta_logits_refuses_an_unknown_augmentation_by_name.'),
    ('data.to_float_batch', 'raiseValueError(None)'):
        ('MESSAGE', 'killed by test_to_float_batch_refuses_anything_but_uint8_batches (the mean-without-std message).'),
    ('recipes.check_option', 'ifvalueisNoneorisinstance(value,(bool,str,dict,tuple))or(loisNoneandhiisnotNone):'):
        ('EQUIVALENT', 'every option without limits holds a str, bool, dict, tuple or None, which return before this test; no option has an upper limit without a lower one.'),
    ('data.to_float_batch', 'scale64=1/(255*_channel_params(std,c,None))'):
        ('NOT EQUIVALENT', 'the error would not name std; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'bias64=-_channel_params(mean,c,None)/_channel_params(std,c,"std")'):
        ('NOT EQUIVALENT', 'the error would not name mean; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'bias64=-_channel_params(mean,c,"mean")/_channel_params(std,c,None)'):
        ('EQUIVALENT', "a std of the wrong length is refused a line earlier, by the scale's check, which names std."),
    ('data.to_float_batch', 'ifresizeisNoneor(resize==horresize==w):'):
        ('NOT EQUIVALENT', 'a non-square image with one side equal to --resize would not be resized; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'ifresizeisNoneor(resize!=handresize==w):'):
        ('NOT EQUIVALENT', 'as above for the other side; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'ifresizeisNoneor(resize==handresize!=w):'):
        ('NOT EQUIVALENT', 'as above; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(c,1,1)).add_(bias64.to(x.device,dtype).view(1,c,1,1))'):
        ('EQUIVALENT', 'a c x 1 x 1 view broadcasts against N x C x H x W exactly as 1 x c x 1 x 1.'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1,1)).add_(bias64.to(x.device,dtype).view(c,1,1))'):
        ('EQUIVALENT', 'a c x 1 x 1 view broadcasts against N x C x H x W exactly as 1 x c x 1 x 1.'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,1,1)).add_(bias64.to(x.device,dtype).view(1,c,1,1))'):
        ('NOT EQUIVALENT', 'wrong broadcast with several channels; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1,1)).add_(bias64.to(x.device,dtype).view(1,1,1))'):
        ('NOT EQUIVALENT', 'wrong broadcast with several channels; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1)).add_(bias64.to(x.device,dtype).view(1,c,1,1))'):
        ('NOT EQUIVALENT', 'wrong broadcast with several channels; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1,1)).add_(bias64.to(x.device,dtype).view(1,c,1))'):
        ('NOT EQUIVALENT', 'wrong broadcast with several channels; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1,)).add_(bias64.to(x.device,dtype).view(1,c,1,1))'):
        ('NOT EQUIVALENT', 'wrong broadcast with several channels; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1,1)).add_(bias64.to(x.device,dtype).view(1,c,1,))'):
        ('NOT EQUIVALENT', 'wrong broadcast with several channels; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images.'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(None,dtype).view(1,c,1,1)).add_(bias64.to(x.device,dtype).view(1,c,1,1))'):
        ('GPU ONLY', 'on the CPU the same tensor; on a GPU the scale/bias stay on the CPU and the in-place product with the batch on the GPU raises (a crash, not a wrong number).'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(dtype).view(1,c,1,1)).add_(bias64.to(x.device,dtype).view(1,c,1,1))'):
        ('GPU ONLY', 'on the CPU the same tensor; on a GPU the scale/bias stay on the CPU and the in-place product with the batch on the GPU raises (a crash, not a wrong number).'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1,1)).add_(bias64.to(None,dtype).view(1,c,1,1))'):
        ('GPU ONLY', 'on the CPU the same tensor; on a GPU the scale/bias stay on the CPU and the in-place product with the batch on the GPU raises (a crash, not a wrong number).'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1,1)).add_(bias64.to(dtype).view(1,c,1,1))'):
        ('GPU ONLY', 'on the CPU the same tensor; on a GPU the scale/bias stay on the CPU and the in-place product with the batch on the GPU raises (a crash, not a wrong number).'),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,None).view(1,c,1,1)).add_(bias64.to(x.device,dtype).view(1,c,1,1))'):
        ('NOT EQUIVALENT', "the scale kept in float64, not rounded to the batch's dtype as documented; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images."),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,).view(1,c,1,1)).add_(bias64.to(x.device,dtype).view(1,c,1,1))'):
        ('NOT EQUIVALENT', "the scale kept in float64, not rounded to the batch's dtype as documented; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images."),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1,1)).add_(bias64.to(x.device,None).view(1,c,1,1))'):
        ('NOT EQUIVALENT', "the bias kept in float64, not rounded to the batch's dtype as documented; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images."),
    ('data.to_float_batch', 'returny.mul_(scale64.to(x.device,dtype).view(1,c,1,1)).add_(bias64.to(x.device,).view(1,c,1,1))'):
        ('NOT EQUIVALENT', "the bias kept in float64, not rounded to the batch's dtype as documented; killed by test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images."),
    ('data.to_float_batch', 'g,b,k=index.shape[0],blocks.shape[+2],index.shape[1]'):
        ('EQUIVALENT', 'b (the rows per block) is not used after this line in to_float_batch: a dead value.'),
    ('data.to_float_batch', 'g,b,k=index.shape[0],blocks.shape[-3],index.shape[1]'):
        ('EQUIVALENT', 'as above: b is not used.'),
    ('data.to_float_batch', 'rows=tif(g==1)andFalseelset[:,:,index]#NxCxGxkxresize'):
        ('SPEED', 'with one block the index holds every input row in order (k = H), so indexing copies t unchanged: the same numbers, one copy more.'),
    ('trainer.run_epoch', 'check_every=1ifs.device.type=="cpu"else26#ahostsync;cheaponCPU,batchedonGPU'):
        ('GPU ONLY', 'how often a GPU run syncs to check its loss (every 25 or 26 steps; the weights are checked before every checkpoint anyway); the CPU checks every step. No number of a finished run changes.'),
    ('trainer.run_epoch', 'check_every=1if(setup.device.type=="cpu")orTrueelse25#ahostsync;cheaponCPU,batchedonGPU'):
        ('SPEED', 'a GPU run would also check its loss after every step: one host sync a step more, the same numbers.'),
    ('trainer.run_epoch', 'ifnotbar.disableand(state.batch/check_every==0orlast):#hostsyncsonlywhenabarisshown'):
        ('OUTPUT', 'when or what the progress bar shows (on a terminal only): no number of the run changes.'),
    ('trainer.run_epoch', 'ifnotbar.disableand(state.batch%check_every!=0orlast):#hostsyncsonlywhenabarisshown'):
        ('OUTPUT', 'when or what the progress bar shows (on a terminal only): no number of the run changes.'),
    ('trainer.run_epoch', 'ifnotbar.disableand(state.batch%check_every==1orlast):#hostsyncsonlywhenabarisshown'):
        ('OUTPUT', 'when or what the progress bar shows (on a terminal only): no number of the run changes.'),
    ('trainer.run_epoch', 'ifnotbar.disableor(state.batch%check_every==0orlast):#hostsyncsonlywhenabarisshown'):
        ('OUTPUT', "the bar's numbers computed when no bar is shown too (a disabled tqdm ignores them): host syncs, no number changes."),
    ('trainer.run_epoch', 'ifnotbar.disableand(state.batch%check_every==0andlast):#hostsyncsonlywhenabarisshown'):
        ('OUTPUT', 'when or what the progress bar shows (on a terminal only): no number of the run changes.'),
    ('trainer.run_epoch', 'show_progress(bar,state,dist.world_size,state.epoch_seconds-time.perf_counter()-t0,lr)'):
        ('OUTPUT', "the bar's images/s: output only (the metrics' seconds are kept apart and tested)."),
    ('trainer.run_epoch', 'bar.update(2)'):
        ('OUTPUT', 'when or what the progress bar shows (on a terminal only): no number of the run changes.'),
    ('trainer.run_epoch', 'ifcfg.save_everyandrunisnotNoneortime.monotonic()-last_save>cfg.save_every*60:'):
        ('SPEED', 'mid-epoch checkpoints at other times (after every step, or a little later): a checkpoint does not change the training (resuming from any of them is bit-identical, test_save_every_checkpoints_hold_their_exact_position_and_resume_bit_identically); slower, the same numbers.'),
    ('trainer.run_epoch', 'ifcfg.save_everyorrunisnotNoneandtime.monotonic()-last_save>cfg.save_every*60:'):
        ('SPEED', 'mid-epoch checkpoints at other times (after every step, or a little later): a checkpoint does not change the training (resuming from any of them is bit-identical, test_save_every_checkpoints_hold_their_exact_position_and_resume_bit_identically); slower, the same numbers.'),
    ('trainer.run_epoch', 'ifcfg.save_everyandrunisnotNoneandtime.monotonic()+last_save>cfg.save_every*60:'):
        ('SPEED', 'mid-epoch checkpoints at other times (after every step, or a little later): a checkpoint does not change the training (resuming from any of them is bit-identical, test_save_every_checkpoints_hold_their_exact_position_and_resume_bit_identically); slower, the same numbers.'),
    ('trainer.run_epoch', 'ifcfg.save_everyandrunisnotNoneandtime.monotonic()-last_save>=cfg.save_every*60:'):
        ('EQUIVALENT', 'differs only when the clock reads exactly the interval: not observable.'),
    ('trainer.run_epoch', 'ifcfg.save_everyandrunisnotNoneandtime.monotonic()-last_save>cfg.save_every/60:'):
        ('SPEED', 'mid-epoch checkpoints at other times (after every step, or a little later): a checkpoint does not change the training (resuming from any of them is bit-identical, test_save_every_checkpoints_hold_their_exact_position_and_resume_bit_identically); slower, the same numbers.'),
    ('trainer.run_epoch', 'ifcfg.save_everyandrunisnotNoneandtime.monotonic()-last_save>cfg.save_every*61:'):
        ('SPEED', 'mid-epoch checkpoints at other times (after every step, or a little later): a checkpoint does not change the training (resuming from any of them is bit-identical, test_save_every_checkpoints_hold_their_exact_position_and_resume_bit_identically); slower, the same numbers.'),
    ('trainer.run_epoch', 'state.epoch_seconds=time.perf_counter()-t0'):
        ('NOT EQUIVALENT', "an epoch's seconds (and images/s) would leave out the steps before a mid-epoch checkpoint; killed by test_epoch_seconds_cover_every_step_even_across_mid_epoch_checkpoints."),
    ('trainer.run_epoch', 'state.epoch_seconds-=time.perf_counter()-t0'):
        ('NOT EQUIVALENT', 'negative seconds; killed by test_epoch_seconds_cover_every_step_even_across_mid_epoch_checkpoints.'),
    ('trainer.run_epoch', 'state.epoch_seconds+=time.perf_counter()+t0'):
        ('NOT EQUIVALENT', 'seconds far beyond the wall time; killed by test_epoch_seconds_cover_every_step_even_across_mid_epoch_checkpoints.'),
    ('trainer.run_epoch', 'last=None'):
        ('OUTPUT', "the epoch's last step then updates the bar and checks the loss only on the usual interval; on the CPU (interval 1) nothing changes, on a GPU a NaN in the last steps is still caught by the weights check before the checkpoint (test_nan_weights_are_never_checkpointed)."),
    ('trainer.run_epoch', 'last=state.batch!=setup.steps_per_epoch'):
        ('SPEED', 'on the CPU the loss is checked every step anyway; on a GPU it would be checked every step but the last: host syncs, no number changes.'),
    ('trainer.run_epoch', 'ifstate.batch%check_every==0orlastanddry_run:'):
        ('EQUIVALENT', "on the CPU (interval 1) every step is checked either way; on a GPU the last step's check falls to the weights check before the checkpoint."),
}


def mutant_globs() -> list[str]:
    globs = []
    for mod, funcs in SCOPE.items():
        for f in funcs:
            if "." in f:
                cls, meth = f.split(".")
                globs.append(f"nin.{mod}.xǁ{cls}ǁ{meth}__mutmut_*")
            else:
                globs.append(f"nin.{mod}.x_{f}__mutmut_*")
    return globs


def prepare(work: Path, tests: list[str]) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    paths = [f"src/nin/{m.replace('.', '/')}.py" for m in SCOPE]
    toml = (ROOT / "pyproject.toml").read_text()
    toml += "\n[tool.mutmut]\n"
    toml += f"source_paths = [\"src\"]\nonly_mutate = {paths!r}\n".replace("'", '"')
    toml += f"pytest_add_cli_args_test_selection = {tests!r}\n".replace("'", '"')
    toml += f"pytest_add_cli_args = [\"-k\", \"{DESELECT}\", \"-p\", \"no:cacheprovider\"]\n"
    # a mutant that loops (an epoch counter that stops moving) is stopped after 5 x 2 x its tests' usual CPU
    # time (mutmut's default, 15 x 2, spent 7 minutes on each such mutant of run_epoch); counted as caught
    toml += "timeout_multiplier = 5.0\n"
    (work / "pyproject.toml").write_text(toml)


ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def run_variant(name: str, tests: list[str], limit_s: int, globs: list[str], resume: bool, children: int) -> None:
    work = ROOT / "runs" / "mutation" / name
    if not (resume and (work / "mutants").is_dir()):
        prepare(work, tests)
    env = ENV
    cmd = [str(MUTMUT), "run", "--max-children", str(children), *globs]
    t0 = time.time()
    log = (work / "mutmut-run.log").open("w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.nice(19), start_new_session=True)
    try:
        proc.wait(timeout=limit_s)
        finished = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # mutmut and its forked test runs
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        finished = False
    with (work / "elapsed.txt").open("a") as f:  # one line per (resumed) run: seconds, finished
        f.write(f"{time.time() - t0:.0f} {int(finished)}\n")


def collect(name: str, tests: list[str], globs: list[str]) -> dict:
    work = ROOT / "runs" / "mutation" / name
    env = ENV
    runs = [ln.split() for ln in (work / "elapsed.txt").read_text().splitlines()]
    secs, finished = sum(float(r[0]) for r in runs), runs[-1][1]
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=work, env=env,
                         capture_output=True, text=True).stdout
    status = {}
    for line in out.splitlines():
        m = re.match(r"\s*(nin\.\S+):\s*(.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    in_scope = [re.compile(g.replace(".", r"\.").replace("*", ".*") + "$") for g in globs]
    status = {k: v for k, v in status.items() if any(p.match(k) for p in in_scope)}
    survivors = {}
    for k, v in sorted(status.items()):
        if v == "survived":
            survivors[k] = subprocess.run([str(MUTMUT), "show", k], cwd=work, env=env,
                                          capture_output=True, text=True).stdout
    return {"name": name, "tests": tests, "status": status, "survivors": survivors,
            "elapsed": float(secs), "finished": finished == "1"}


def function_of(mutant: str) -> str:
    m = re.match(r"nin\.(\w+)\.x(?:_|ǁ)(.+?)__mutmut_\d+$", mutant)
    return f"{m.group(1)}.{m.group(2).replace('ǁ', '.')}" if m else mutant


def mutated_line(diff: str) -> str:
    plus = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return plus[0].strip() if plus else ""


def classify(mutant: str, diff: str) -> tuple[str, str]:
    key = (function_of(mutant), re.sub(r"\s+", "", mutated_line(diff)))
    if key in CLASSIFIED:
        return CLASSIFIED[key]
    minus = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = mutated_line(diff)
    # a changed dict key or subscript ("XXtest_lossXX": ..., row["VAL_ACC"]) renames data, not a message
    renames_a_key = re.search(r'"(XX[^"]*XX|[A-Z_]+)"\s*:|\["(XX[^"]*XX|[A-Z_]+)"\]', plus)
    if minus and not renames_a_key and plus.replace("XX", "").lower() == minus[0].strip().replace("XX", "").lower():
        return ("MESSAGE", "only the case of a string or XX marks in it: the text of a message, no number.")
    return ("UNCLASSIFIED", "not yet judged")


def counts(r: dict) -> str:
    c: dict[str, int] = {}
    for v in r["status"].values():
        c[v] = c.get(v, 0) + 1
    return ", ".join(f"{k} {n}" for k, n in sorted(c.items(), key=lambda kv: -kv[1]))


def report(results: list[dict], date: str, command: str, children: int = 1) -> str:
    lines = [f"# Mutation testing of the training core ({date})", "",
             f"Command: `{command}` (mutmut 3.8.1, `--max-children {children}`, niced, `OMP_NUM_THREADS=1`).", "",
             "Scope (only these functions' mutants are run):", ""]
    for mod, funcs in SCOPE.items():
        if funcs:
            lines.append(f"- `src/nin/{mod.replace('.', '/')}.py`: " + ", ".join(f"`{f}`" for f in funcs))
    left = [f"{mod}.{f}" for mod, funcs in FULL_SCOPE.items() for f in funcs if f not in SCOPE[mod]]
    if left:
        lines += ["", "Left out of this run (the whole scope is about 1230 mutants, roughly an hour per selection "
                  "on this 2-core CPU): " + ", ".join(f"`{f}`" for f in left) + "."]
    lines += ["", "Not mutated: mutmut 3 skips decorated functions, so " + " and ".join(f"`{d}`" for d in DECORATED)
              + " have no mutants (their bodies are covered only through the tests, not measured here).", "",
              f"Tests per mutant: mutmut runs only the tests that call the mutated function, from the selection "
              f"below, with `-k \"{DESELECT}\"`.", "", "## Counts", "",
              "| selection | tests | mutants | killed | survived | no test calls it | not run (time limit) | wall |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        st = list(r["status"].values())
        lines.append(f"| {r['name']} | {describe(r['tests'])} | {len(st)} | {st.count('killed')} | "
                     f"{st.count('survived')} | {st.count('no tests')} | {st.count('not checked')} | "
                     f"{r['elapsed'] / 60:.1f} min{'' if r['finished'] else ' (partial)'} |")
    lines += ["", "\"before\" leaves out the tests written for issue 21 (once tests/test_guards.py and "
              "tests/reliability/test_defects.py, now in the files of their subjects: ISSUE_21_FILES and "
              "ISSUE_21_TESTS in benchmarks/mutation.py); \"after\" includes them.", ""]
    lines += ["Mutants not run were cut by the time limit; the counts are of the mutants that did run.", "",
              "The tests named \"killed by\" below were written from this report, after the run (the run used the "
              "test files as they were when it started); each was checked against its mutant by putting the mutated "
              "line into the function and running the test."]
    last = results[-1]
    unjudged = sum(classify(k, d)[0] == "UNCLASSIFIED" for k, d in last["survivors"].items())
    lines += [f"{unjudged} survivors are not judged yet (UNCLASSIFIED below)." if unjudged else
              "Every survivor is judged; with those tests no non-equivalent survivor is left.", ""]
    lines += [f"## Survivors of \"{last['name']}\" ({len(last['survivors'])})", ""]
    for k, diff in last["survivors"].items():
        cls, why = classify(k, diff)
        lines += [f"### `{k}` — {cls}", "", why, "", "```diff",
                  "\n".join(ln for ln in diff.splitlines() if ln.startswith(("+", "-", "@")) and not ln.startswith(("+++", "---"))),
                  "```", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["before", "after", "both"], default="both")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--limit-min", type=float, default=25.0, help="time limit per variant, minutes")
    ap.add_argument("--functions", default="",
                    help="comma-separated subset of SCOPE, e.g. training.recipes.lr_at,training.engine.Ema.* (default: all of SCOPE)")
    ap.add_argument("--max-children", type=int, default=1, help="mutants tested at once (one thread each)")
    ap.add_argument("--resume", action="store_true", help="keep runs/mutation/<variant>/ and its finished mutants")
    ap.add_argument("--no-report", action="store_true", help="only run (e.g. the two variants in parallel)")
    ap.add_argument("--report-only", action="store_true", help="only write the report from runs/mutation/")
    args = ap.parse_args()
    if args.functions:
        wanted = args.functions.split(",")
        for mod in SCOPE:
            SCOPE[mod] = [f for f in SCOPE[mod] if f"{mod}.{f}" in wanted]
    globs = mutant_globs()
    variants = {n: selection(n) for n in ("before", "after")}
    names = ["before", "after"] if args.variant == "both" else [args.variant]
    if not args.report_only:
        for n in names:
            run_variant(n, variants[n], int(args.limit_min * 60), globs, args.resume, args.max_children)
    if args.no_report:
        return
    results = [collect(n, variants[n], globs) for n in names]
    out = ROOT / "benchmarks" / "results" / f"mutation-{args.date}.md"
    extra = (f"--functions {args.functions} " if args.functions else "") + (
        f"--max-children {args.max_children}" if args.max_children != 1 else "")
    command = "make mutation" + (f" MUTATION_ARGS='{extra.strip()}'" if extra.strip() else "")
    out.write_text(report(results, args.date, command, args.max_children))
    for r in results:
        print(f"{r['name']}: {len(r['status'])} mutants: {counts(r)} ({r['elapsed'] / 60:.1f} min)")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
