"""Run-directory rules: what a run dir holds, whether this launch may write into it, and the
lock that makes one launch at a time the only writer of a run dir."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from distill_cli import keys
from distill_cli.errors import UserError
from distill_cli.io import read_json

LAST = Path("checkpoints") / "last.pt"
#: held (flock) by the launch that writes the run dir, for the whole run; it holds the holder's
#: pid and host as JSON, and is removed when the run ends (the kernel drops the lock of a
#: killed holder, so a dead run never blocks the next launch)
LOCK_FILE = ".distill.lock"
#: how many differing keys a refused resume lists before "and N more"
SHOWN_DIFFS = 6

# Keys that may differ when a run is continued (they do not change what is computed; a step
# skipped by trainer.on_nonfinite=skip would have ended the run under `stop`).
RESUME_FREE_KEYS = ("trainer.resume", "trainer.stop_at_step", "trainer.log_every_n_steps",
                    "trainer.on_nonfinite",
                    "trainer.checkpoint_every_n_steps", "trainer.eval_batch_size", "logger",
                    "trainer.channels_last", "trainer.compile", "teacher.outputs", "eval",
                    "trainer.threads", "trainer.cudnn_benchmark",
                    # removed (recipe_loss/ replaced it); its values show in `loss.*` anyway
                    "loss_options")
# Keys added after checkpoints already existed, with the value that reproduces what those runs
# computed: a checkpoint without the key counts as having that value.
ADDED_KEYS = {"teachers": [], "self_distill.generations": 0, "self_distill.alpha": 0.5,
              "task._target_": "distill_cli.tasks.classification.task.ClassificationTask",
              "trainer.sync_batchnorm": False, "trainer.threads": "auto",
              "trainer.on_nonfinite": "stop"}

# run dirs this process holds the lock of (a run inside a run, e.g. the teacher store's, takes
# its own dir's; the same dir twice is re-entrant, never a self-deadlock)
_HELD: dict[str, int] = {}


class RunDirBusy(UserError):
    """Another live process holds the run dir's lock."""

    def __init__(self, run_dir: Path, holder: dict):
        who = (f"process {holder['pid']}" + (f" on {holder['host']}" if holder.get("host")
                                              and holder["host"] != socket.gethostname() else "")
               if holder.get("pid") else "another process (its pid is not recorded yet)")
        self.holder = holder
        super().__init__(f"{run_dir} is in use: {who} is running in it (it holds "
                         f"{run_dir / LOCK_FILE}); two launches into one run dir would "
                         "overwrite each other", "hydra.run.dir",
                         "Wait for that run to end (or stop it: SIGTERM writes a checkpoint "
                         "that trainer.resume=auto continues), or choose another hydra.run.dir")


def _holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _open_locked(path: Path) -> int | dict:
    """The fd of `path` locked by this process, or the holder's record (a dict) when another
    process holds it. A file removed by a releasing holder between our open and our flock is
    a dead inode: open again."""
    for _ in range(100):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:   # no O_TRUNC: the holder's record must survive our attempt
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:   # the dir was removed under us: create it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = _holder(fd)
            os.close(fd)
            return holder
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise OSError(f"could not lock {path}: it keeps being replaced")


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, hold: bool = True) -> Iterator[None]:
    """Hold `run_dir`'s lock (LOCK_FILE, created with the dir if need be) while the block runs;
    `RunDirBusy` (exit 2, naming the holder's pid) when another live process holds it. `hold`
    False: a no-op (the torchrun ranks other than 0, which never write the run dir). A dir this
    call created and nothing else wrote into is removed again on the way out."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())   # one key per directory, however it is spelled
    if not hold or key in _HELD:
        yield
        return
    created = not run_dir.exists()
    path = run_dir / LOCK_FILE
    fd = _open_locked(path)
    if isinstance(fd, dict):
        raise RunDirBusy(run_dir, fd)
    _HELD[key] = fd
    try:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        yield
    finally:
        del _HELD[key]
        # unlinked while still held: a waiter that opened it sees a dead inode and retries
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):   # only when empty
                run_dir.rmdir()


def refuse_if_busy(run_dir: Path) -> None:
    """`RunDirBusy` when another live process holds `run_dir`'s lock (a check only: the lock
    is released at once; this process's own hold is never "another")."""
    run_dir = Path(run_dir)
    if str(run_dir.resolve()) in _HELD or not (run_dir / LOCK_FILE).exists():
        return
    with run_dir_lock(run_dir):
        pass


class RunFinished(UserError):
    """`trainer.resume=if_any` found a finished run: nothing to do, and nothing is rerun or
    rewritten. Exit code 0 (the run is done); `summary` is its summary.json, which is what
    `run()` returns for it once it catches this (see check_run_dir)."""

    exit_code = 0

    def __init__(self, run_dir: Path, summary: dict):
        self.run_dir, self.summary = Path(run_dir), summary
        super().__init__(f"The run in {run_dir} already finished; trainer.resume=if_any leaves "
                         "a finished run as it is (nothing rerun)", "trainer.resume",
                         "To train it further, fork it into a new run dir: "
                         "trainer.resume=<run>/checkpoints/last.pt and a larger trainer.epochs")


def check_run_dir(run_dir: Path, resume: str | None) -> bool:
    """Return True when `run_dir` already holds a run this launch continues, False when this
    launch starts a run in it; raise UserError when the launch would overwrite a run, has
    nothing to resume, or another live process runs in the dir (`RunDirBusy`).

    `resume=auto` continues an unfinished run from checkpoints/last.pt (a self-distillation
    run from its generations). `resume=if_any` (requeued or re-submitted sweep jobs, e.g.
    `hydra/launcher=slurm`) does the same, starts fresh in an empty dir, and raises
    `RunFinished` for a finished run (exit 0, nothing rerun). Both start a run that stopped
    before its first checkpoint (summary.json only, no epoch recorded: nothing is lost) over
    from step 0, and a plain launch refuses that dir saying so. Refused by all: last.pt missing
    while metrics.jsonl has epochs, and a summary.json that cannot be read with no last.pt
    (whatever run it was is never overwritten)."""
    run_dir = Path(run_dir)
    refuse_if_busy(run_dir)
    summary = read_json(run_dir / "summary.json")
    unreadable = (run_dir / "summary.json").exists() and not isinstance(summary, dict)
    summary = summary if isinstance(summary, dict) else {}
    has_last = (run_dir / LAST).is_file()
    status = summary.get(keys.STATUS)
    if unreadable and not has_last:
        raise UserError(f"{run_dir / 'summary.json'} cannot be read and {run_dir} has no "
                        "checkpoints/last.pt, so what run it holds is unknown; refusing to "
                        "overwrite it", "hydra.run.dir",
                        "Look at that dir first; if its run is not needed, move the dir away "
                        "(or delete its summary.json) and launch again, or choose another "
                        "hydra.run.dir")
    if resume in ("auto", "if_any"):
        if status == "finished":
            if resume == "if_any":
                raise RunFinished(run_dir, summary)
            raise UserError(f"The run in {run_dir} already finished; there is nothing to "
                            "resume", "trainer.resume",
                            "Start a new run (drop trainer.resume), or fork it into a new run "
                            "dir with trainer.resume=<run>/checkpoints/last.pt")
        # a self-distillation run (`generations` in its summary) is made of generation run dirs
        # and has no last.pt of its own: it continues from them
        if has_last or keys.GENERATIONS in summary:
            return True
        if _has_epochs(run_dir):
            raise UserError(f"{run_dir} has recorded epochs (metrics.jsonl) but no "
                            "checkpoints/last.pt to continue them from; refusing to overwrite "
                            "it", "hydra.run.dir", "Choose another hydra.run.dir (or sweep "
                            "dir), or move that run away")
        if resume == "auto" and status is None:
            raise UserError(f"trainer.resume=auto but {run_dir} holds no run to continue (no "
                            "checkpoints/last.pt, no summary.json)", "trainer.resume",
                            "Point hydra.run.dir at the run to continue, pass "
                            "trainer.resume=<path/to/last.pt>, or drop trainer.resume to "
                            "start a new run")
        return False   # empty, or stopped before its first checkpoint: (re)start from step 0
    if has_last or status is not None:
        if not has_last and not _has_epochs(run_dir):
            raise UserError(f"{run_dir} already holds a run (status: {status}) that stopped "
                            "before its first checkpoint; refusing to overwrite it",
                            "hydra.run.dir", "Pass trainer.resume=auto to run it again from "
                            "the start in this dir (no epoch was recorded, nothing is lost), "
                            "or choose another hydra.run.dir")
        if status == "finished":
            fix = ("Choose another hydra.run.dir (the default is a fresh timestamped one); to "
                   "train it further, fork it: trainer.resume=<run>/checkpoints/last.pt")
        else:
            fix = ("Choose another hydra.run.dir (the default is a fresh timestamped one), or "
                   "pass trainer.resume=auto to continue that run")
        raise UserError(f"{run_dir} already holds a run (status: {status or 'unknown'}); "
                        "refusing to overwrite it", "hydra.run.dir", fix)
    return False


def _has_epochs(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and bool(metrics.read_text().strip())


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint file to resume from, or None for a fresh run."""
    if resume is None:
        return None
    if resume in ("auto", "if_any"):   # check_run_dir decided: continue when last.pt is there
        last = Path(run_dir) / LAST
        return last if last.is_file() else None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise UserError(f"trainer.resume={resume} does not exist", "trainer.resume",
                        "Pass a checkpoint file such as <run>/checkpoints/last.pt, "
                        "trainer.resume=auto with hydra.run.dir=<run>, or trainer.resume=if_any")
    return path


def check_same_run(cfg: DictConfig, ckpt: dict, fork: bool = False) -> None:
    """Continuing a run with different settings would silently mix two experiments. That
    includes `trainer.epochs`: the schedules (and any objective that reads the run's length)
    were computed for the original length, so a continued run with another length would end
    unlike a clean run of that length while its config claimed it was one. A `fork`
    (trainer.resume=<checkpoint>, a new run dir) may change it: it is recorded as a fork of
    that checkpoint (keys.FORKED_FROM), not a run of its own length."""
    now = OmegaConf.to_container(cfg, resolve=True)
    then = ckpt["config"]
    diffs = sorted(k for k in _flat_keys(now) | _flat_keys(then)
                   if not k.startswith(RESUME_FREE_KEYS) and _get(now, k) != _then(then, k)
                   and not (fork and k == "trainer.epochs"))
    if diffs:
        shown = ", ".join(f"{k}: {_then(then, k)!r} → {_get(now, k)!r}"
                          for k in diffs[:SHOWN_DIFFS])
        more = len(diffs) - SHOWN_DIFFS
        shown += f", and {more} more" if more > 0 else ""
        fix = ("Repeat the original overrides when resuming (they were: "
               f"{' '.join(ckpt.get('overrides', [])) or 'none'})")
        if "trainer.epochs" in diffs:
            fix += ("; to train it for another number of epochs, fork it into a new run dir: "
                    "trainer.resume=<run>/checkpoints/last.pt hydra.run.dir=<new dir>, or "
                    "start a new run")
        raise UserError(f"The checkpoint was trained with different settings ({shown})",
                        "trainer.resume", fix)


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    flat = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        flat |= _flat_keys(v, key + ".") if isinstance(v, dict) and v else {key}
    return flat


def _get(d: dict, dotted: str, missing=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return missing
        d = d[part]
    return d


def _then(then: dict, dotted: str):
    return _get(then, dotted, ADDED_KEYS.get(dotted))
