"""Where results go: the console (rich on a TTY, fixed columns in CI logs), the run dir's
`metrics.jsonl` / `summary.json`, and W&B."""
from __future__ import annotations

import json
import netrc
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from distill_cli import keys
from distill_cli.io import atomic_write_bytes


class MetricsFile:
    """`metrics.jsonl`: one JSON object per finished epoch, appended and flushed."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop lines of epochs the checkpoint does not cover (a crash between
        writing a line and the checkpoint must not leave a duplicate epoch)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get(keys.EPOCH, 0) <= epoch]
        data = "".join(ln + "\n" for ln in keep).encode()
        atomic_write_bytes(self.path, lambda fh: fh.write(data))

    def append(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()


# --------------------------------------------------------------------------- console
def make_console() -> Console:
    """Rich console; when piped (CI logs) a wide fixed width so tables and lines never wrap."""
    return Console(highlight=False, soft_wrap=True,
                   width=None if sys.stdout.isatty() else 200)


class ConsoleReporter:
    """Progress bars on a TTY; plain fixed-column lines otherwise (identical content)."""

    def __init__(self, total_steps: int, tty: bool | None = None):
        self.console = make_console()
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.total_steps = total_steps
        self.progress = None
        self._header_done = False

    def stage(self, text: str) -> None:
        self.console.print(f"[bold]{text}[/bold]" if self.tty else text)

    def start(self, completed: int) -> None:
        if self.tty:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), console=self.console)
            self.task = self.progress.add_task("train", total=self.total_steps,
                                               completed=completed, info="")
            self.progress.start()

    def step(self, step: int, epoch: int, values: dict[str, float] | None) -> None:
        if self.progress is not None:
            info = "" if values is None else "  ".join(
                f"{k} {v:.4g}" for k, v in values.items())
            self.progress.update(self.task, completed=step, description=f"epoch {epoch}",
                                 **({"info": info} if values is not None else {}))
        elif values is not None:
            if not self._header_done:
                print(f"{'epoch':>5} {'step':>8} " + " ".join(f"{k:>12}" for k in values),
                      flush=True)
                self._header_done = True
            print(f"{epoch:>5} {step:>8} " + " ".join(f"{v:>12.5g}" for v in values.values()),
                  flush=True)

    def epoch_end(self, row: dict) -> None:
        shown = [*(keys.join(keys.VAL, m) for m in ("acc1", "nll", "ece", "agreement")),
                 keys.TRAIN_IMAGES_PER_S]
        text = f"epoch {row[keys.EPOCH]:>3} | " + " | ".join(
            f"{k} {row[k]:.4g}" for k in shown if k in row)
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary_table(self, summary: dict, title: str) -> None:
        table = Table(title=title, show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in (keys.STATUS, keys.EPOCHS, keys.BEST_EPOCH, keys.BEST_VAL_ACC1,
                    keys.BEST_TEST_ACC1, keys.LAST_TEST_ACC1, keys.BEST_TEST_ECE,
                    keys.TEACHER_TEST_ACC1, keys.TRAIN_IMAGES_PER_S, keys.WALL_S):
            if key in summary and summary[key] is not None:
                v = summary[key]
                table.add_row(key, f"{v:.2f}" if isinstance(v, float) else str(v))
        self.console.print(table)


# --------------------------------------------------------------------------- external loggers
class SilentReporter(ConsoleReporter):
    """A data-parallel rank other than 0: it trains, rank 0 alone talks."""

    def __init__(self):
        super().__init__(0, tty=False)

    def stage(self, text: str) -> None:
        pass

    def start(self, completed: int) -> None:
        pass

    def step(self, step: int, epoch: int, values: dict[str, float] | None) -> None:
        pass

    def epoch_end(self, row: dict) -> None:
        pass

    def stop(self) -> None:
        pass

    def summary_table(self, summary: dict, title: str) -> None:
        pass


class NullLogger:
    run_id: str | None = None

    def __init__(self, **_: Any):
        pass

    def log(self, values: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def log_model(self, checkpoints: dict, summary: dict | None = None) -> None:
        pass

    def log_image(self, name: str, path, step: int | None = None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _wandb_mode() -> str:
    """WANDB_MODE wins; otherwise online only when credentials exist (never prompt)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        auth = None
    return "online" if auth else "offline"


class WandbLogger:
    """One W&B run per distill run, files in `<run_dir>/wandb`. Resumes the same W&B run id
    when the distill run resumes."""

    def __init__(self, run_dir: Path, config: dict, name: str, group: str | None = None,
                 run_id: str | None = None, project: str = "distill_cli",
                 entity: str | None = None, tags: list | None = None):
        import wandb  # imported lazily: it costs ~1 s and `logger=none` runs never need it

        self._wandb = wandb
        self.run = wandb.init(dir=str(run_dir), project=project, entity=entity,
                              config=config, name=name, group=group, tags=list(tags or []),
                              id=run_id, resume="allow" if run_id else None,
                              mode=_wandb_mode(), reinit="finish_previous",
                              settings=wandb.Settings(console="off", silent=True))
        self.run_id = self.run.id

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def log_image(self, name: str, path, step: int | None = None) -> None:
        """An image file (e.g. a synthetic set's grid) under `name`."""
        self.run.log({name: self._wandb.Image(str(path))}, step=step)

    def log_model(self, checkpoints: dict, summary: dict | None = None) -> None:
        """The student as a W&B `model` artifact `student-<run id>`: one version per
        `{alias: checkpoint path}` (e.g. `best` → best.pt, `latest` → last.pt), each the run's
        checkpoint file as `checkpoint.pt` (what `teacher.checkpoint=` and `distill-export`'s
        run dirs read). Identical files (best = last) share one version and its aliases on the
        server. Metadata: the alias and the summary's scalar values (test acc1 etc.)."""
        meta = {k: v for k, v in (summary or {}).items()
                if isinstance(v, (int, float, str, bool)) or v is None}
        for alias, path in checkpoints.items():
            art = self._wandb.Artifact(f"student-{self.run.id}", type="model",
                                       metadata={**meta, "weights": alias})
            art.add_file(str(path), name="checkpoint.pt")
            self.run.log_artifact(art, aliases=[alias])

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
