"""Run-directory rules: what a run dir holds, and whether this launch may write into it."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distill_cli import keys
from distill_cli.errors import UserError
from distill_cli.io import read_json

LAST = Path("checkpoints") / "last.pt"

# Keys that may differ when a run is continued (they do not change what is computed).
RESUME_FREE_KEYS = ("trainer.resume", "trainer.stop_at_step", "trainer.log_every_n_steps",
                    "trainer.checkpoint_every_n_steps", "trainer.eval_batch_size", "logger",
                    "trainer.channels_last", "trainer.compile", "teacher.outputs", "eval",
                    "trainer.threads", "trainer.cudnn_benchmark",
                    # removed (recipe_loss/ replaced it); its values show in `loss.*` anyway
                    "loss_options")
# Keys added after checkpoints already existed, with the value that reproduces what those runs
# computed: a checkpoint without the key counts as having that value.
ADDED_KEYS = {"teachers": [], "self_distill.generations": 0, "self_distill.alpha": 0.5,
              "task._target_": "distill_cli.tasks.classification.task.ClassificationTask",
              "trainer.sync_batchnorm": False, "trainer.threads": "auto"}


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
    """Return True when `run_dir` already holds a run this launch continues; raise UserError
    when the launch would overwrite a run or has nothing to resume.

    `resume=if_any` (requeued or re-submitted sweep jobs, e.g. `hydra/launcher=slurm`): an
    unfinished run (with checkpoints/last.pt, or a self-distillation run) is continued like
    `auto`; a dir without one starts fresh — empty, or a job stopped before its first
    checkpoint (summary.json only: no epoch was recorded, nothing is lost); a finished run
    raises `RunFinished` (exit 0, nothing rerun); last.pt missing while metrics.jsonl has
    epochs is refused like a fresh launch."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json") or {}
    has_last = (run_dir / LAST).is_file()
    status = summary.get(keys.STATUS)
    if resume == "if_any":
        if status == "finished":
            raise RunFinished(run_dir, summary)
        if has_last or keys.GENERATIONS in summary:
            return True
        if _has_epochs(run_dir):
            raise UserError(f"{run_dir} has recorded epochs (metrics.jsonl) but no "
                            "checkpoints/last.pt to continue them from; refusing to overwrite "
                            "it", "hydra.run.dir", "Choose another hydra.run.dir (or sweep "
                            "dir), or move that run away")
        return False
    if resume == "auto":
        # a self-distillation run (`generations` in its summary) is made of generation run dirs
        # and has no last.pt of its own: it continues from them
        if not has_last and keys.GENERATIONS not in summary:
            raise UserError(f"trainer.resume=auto but {run_dir} has no checkpoints/last.pt "
                            "to continue", "trainer.resume",
                            "Point hydra.run.dir at the run to continue, pass "
                            "trainer.resume=<path/to/last.pt>, or drop trainer.resume to "
                            "start a new run")
        if status == "finished":
            raise UserError(f"The run in {run_dir} already finished; there is nothing to "
                            "resume", "trainer.resume",
                            "Start a new run (drop trainer.resume), or fork it with "
                            "trainer.resume=<run>/checkpoints/last.pt and a larger "
                            "trainer.epochs")
        return True
    if has_last or status is not None:
        raise UserError(f"{run_dir} already holds a run (status: {status or 'unknown'}); "
                        "refusing to overwrite it", "hydra.run.dir",
                        "Choose another hydra.run.dir (the default is a fresh timestamped "
                        "one), or pass trainer.resume=auto to continue that run")
    return False


def _has_epochs(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and bool(metrics.read_text().strip())


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint file to resume from, or None for a fresh run."""
    if resume is None:
        return None
    if resume == "auto":
        return Path(run_dir) / LAST
    if resume == "if_any":   # check_run_dir decided: continue when last.pt is there
        last = Path(run_dir) / LAST
        return last if last.is_file() else None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise UserError(f"trainer.resume={resume} does not exist", "trainer.resume",
                        "Pass a checkpoint file such as <run>/checkpoints/last.pt, "
                        "trainer.resume=auto with hydra.run.dir=<run>, or trainer.resume=if_any")
    return path


def check_same_run(cfg: DictConfig, ckpt: dict) -> None:
    """Continuing a run with different settings would silently mix two experiments."""
    now = OmegaConf.to_container(cfg, resolve=True)
    then = ckpt["config"]
    diffs = [k for k in _flat_keys(now) | _flat_keys(then)
             if not k.startswith(RESUME_FREE_KEYS) and _get(now, k) != _then(then, k)
             and k != "trainer.epochs"]
    if diffs:
        shown = ", ".join(f"{k}: {_get(then, k)!r} → {_get(now, k)!r}" for k in sorted(diffs)[:6])
        raise UserError(f"The checkpoint was trained with different settings ({shown})",
                        "trainer.resume", "Repeat the original overrides when resuming "
                        f"(they were: {' '.join(ckpt.get('overrides', [])) or 'none'})")


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
