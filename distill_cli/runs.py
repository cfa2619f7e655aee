"""Run-directory rules: what a run dir holds, and whether this launch may write into it."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .tracking import read_json

LAST = Path("checkpoints") / "last.pt"


def check_run_dir(run_dir: Path, resume: str | None) -> bool:
    """Return True when `run_dir` already holds a run this launch continues; raise UserError
    when the launch would overwrite a run or has nothing to resume."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json") or {}
    has_last = (run_dir / LAST).is_file()
    status = summary.get("status")
    if resume == "auto":
        # a self-distillation run (`generations` in its summary) is made of generation run dirs
        # and has no last.pt of its own: it continues from them
        if not has_last and "generations" not in summary:
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


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint file to resume from, or None for a fresh run."""
    if resume is None:
        return None
    if resume == "auto":
        return Path(run_dir) / LAST
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise UserError(f"trainer.resume={resume} does not exist", "trainer.resume",
                        "Pass a checkpoint file such as <run>/checkpoints/last.pt, or "
                        "trainer.resume=auto with hydra.run.dir=<run>")
    return path
