"""The names of the values a run records: `summary.json`, `metrics.jsonl` rows, W&B keys, the
teacher info that keys the teacher-output store, and the `distill-report` row.

Ground floor: imports nothing from distill_cli, so every floor can use it. These strings are
on disk in every run dir and teacher store already written: a value here never changes (add a
new key instead). Metrics are percent (acc1, pgd_acc1) or fractions (ece) as `score` returns
them; `best` is the val-selected `checkpoints/best.pt`, `last` the final weights.
"""
from __future__ import annotations

SEP = "/"  # joins a key's parts: prefix / split / metric


def join(*parts: str) -> str:
    """A key built from parts: `join(BEST_TEST, "nll") == "best/test/nll"`."""
    return SEP.join(parts)


# --------------------------------------------------------------------------- run bookkeeping
TASK = "task"  # the kind of distillation (`task=`): which report columns and metrics apply
SELECTION_METRIC = "selection_metric"   # the val metric that selected best.pt (the task's)
STATUS = "status"  # running | interrupted | failed | diverged | finished (a search: scored |
# trained); diverged: the loss or weights became nan/inf (trainer.on_nonfinite=stop)
WALL_S = "wall_s"  # wall-clock seconds of the run, summed over resumed launches
EPOCHS = "epochs"  # number of epochs trained when the summary was written
BEST_EPOCH = "best/epoch"  # epoch whose val metric selected best.pt
RUN_DIR = "run_dir"  # the run's directory, as a string
GIT = "git"  # git revision of the code that trained the run (None outside a checkout)
MACHINE = "machine"  # the kind of machine whose kernels computed the run (CPU model and ISA or
# CUDA device, torch version): runs are bit-exact within one kind (runs/provenance.machine_kind)
OVERRIDES = "overrides"  # the Hydra command-line overrides of the run, a list of strings
ERROR = "error"  # "<ExceptionType>: <message>" of a failed run, at most 500 characters
WANDB_ID = "wandb_id"  # W&B run id (None without W&B); checkpoints hold it to resume the run
GENERATIONS = "generations"  # self-distillation: a record per generation (marks such a summary)
FORKED_FROM = "forked_from"  # a fork (trainer.resume=<checkpoint>): {checkpoint, epoch, step,
# trainer.epochs} of the checkpoint it continued; in its summary and in every checkpoint it writes
NONFINITE_STEP = "nonfinite/step"  # the global step (1-based) whose loss/weights became nan/inf
NONFINITE_SKIPPED = "nonfinite/skipped_steps"  # steps skipped by trainer.on_nonfinite=skip

# --------------------------------------------------------------------------- what was trained
# (also the names of config groups: these are the summary's copies, which distill-report groups by)
SEED = "seed"  # the run's seed (a self-distillation generation's: seed + generation)
DATASET = "dataset"  # the dataset's name (DataBundle.name)
STUDENT = "student"  # the student's architecture name
TEACHER_ARCH = "teacher"  # the teacher's architecture name, None without a teacher
LOSS = "loss"  # the loss class name, e.g. "CrossEntropy", "KD"

# --------------------------------------------------------------------------- metrics.jsonl rows
EPOCH = "epoch"  # the epoch a metrics.jsonl row ends (1-based)
STEP = "step"  # optimizer steps taken (a row's, or the summary's at the end of training)
LR = "lr"  # learning rate of the student's first parameter group
TRAIN_SKIPPED_STEPS = "train/skipped_steps"  # an epoch's steps skipped (on_nonfinite=skip)

# --------------------------------------------------------------------------- prefixes
BEST_TEST = "best/test"  # + "/<metric>": test metrics of best.pt
BEST_VAL = "best/val"  # + "/<selection metric>": best val score so far (selects best.pt)
LAST_TEST = "last/test"  # + "/<metric>": test metrics of the final weights
TRAIN = "train"  # + "/<term>": training-loss terms (per epoch, per logging window on W&B)
VAL = "val"  # + "/<metric>": per-epoch validation metrics of the student
TEACHER = "teacher"  # + "/...": the (single) teacher: where it came from, its test metrics
TEACHERS = "teachers"  # + "/...": a multi-teacher pool; "teachers/<i>/test/<metric>" per member

# --------------------------------------------------------------------------- final metrics
BEST_TEST_ACC1 = "best/test/acc1"  # test top-1 of the val-selected best.pt, percent
BEST_VAL_ACC1 = "best/val/acc1"  # val top-1 that selected best.pt, percent
LAST_TEST_ACC1 = "last/test/acc1"  # test top-1 of the final weights, percent
# dataset distillation: the std of test top-1 over the protocol's evaluation networks of one run
BEST_TEST_MODEL_STD = "best/test/acc1_model_std"
BEST_TEST_ECE = "best/test/ece"  # expected calibration error of best.pt on test, fraction
BEST_TEST_PGD_ACC1 = "best/test/pgd_acc1"  # PGD robust test top-1 of best.pt, percent (eval.pgd)
LAST_TEST_PGD_ACC1 = "last/test/pgd_acc1"  # PGD robust test top-1 of the final weights, percent
TEACHER_TEST_ACC1 = "teacher/test/acc1"  # test top-1 of the teacher, percent
TRAIN_IMAGES_PER_S = "train/images_per_s"  # training throughput of the last epoch, images/s
THREADS = "threads"  # CPU threads the run trained with (trainer.threads, training/threads.py)
EVAL_VIEW = "eval/view"  # what val/test NLL and ECE are of: raw logits, or the objective's view
                         # (MIX-KD: std_scaled, as its authors evaluate); accuracy is the same
CHANNELS_LAST = "channels_last"  # whether the run's networks were NHWC (trainer.channels_last)
WORLD_SIZE = "world_size"  # data-parallel processes (torchrun ranks); also in every checkpoint
MALLOC_TUNED = "malloc_tuned"  # whether the allocator settings of `distill` were in force

# --------------------------------------------------------------------------- teacher info
# Where the teacher came from; `teacher/key`, `teacher/checkpoint`, `teacher/source`,
# `teacher/bn_folded` and `teacher/head` also identify its stored outputs (teachers/outputs.py).
TEACHER_SOURCE = "teacher/source"  # store | checkpoint | online | weights:<name> | random init
TEACHER_KEY = "teacher/key"  # the teacher store's content key of the teacher
TEACHER_CHECKPOINT = "teacher/checkpoint"  # path of the teacher checkpoint, as given
TEACHER_SEED = "teacher/seed"  # an online teacher's teacher.seed
TEACHER_STORE_HIT = "teacher/store_hit"  # True when the store held the teacher already
TEACHER_STORE_DIR = "teacher/store_dir"  # the teacher's entry directory in the store
TEACHER_BN_FOLDED = "teacher/bn_folded"  # True when BatchNorm was folded into its convs
TEACHER_HEAD = "teacher/head"  # "ncm": a pool member's head refitted as nearest class mean
TEACHER_OUTPUTS = "teacher/outputs"  # stored | live: how the student sees the teacher outputs
TEACHER_OUTPUTS_KEY = "teacher/outputs_key"  # output-store key(s), a list for a pool
TEACHER_OUTPUTS_HIT_RATE = "teacher/outputs_hit_rate"  # fraction of tables served, not built
TEACHER_OUTPUTS_DIR = "teacher/outputs_dir"  # output-store directory(ies), a list for a pool
TEACHERS_ENTRIES = "teachers/entries"  # a pool's members: arch and teacher info, in order
TEACHERS_SCORES = "teachers/scores"  # each member's train top-1 (fraction) on the dataset
TEACHERS_WEIGHTS = "teachers/weights"  # each member's weight in the pool objective

# --------------------------------------------------------------------------- distill-report
GAIN = "gain"  # report column: the metric's mean minus the CE baseline's (not in summary.json)
