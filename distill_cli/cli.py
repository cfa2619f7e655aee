"""Console entry points only. `distill` = Hydra app over the package's conf/ (recipes are its group
`recipe`), found through Hydra's package search path: any install, any working directory.
`python -m distill_cli` is `distill` (distill_cli/__main__.py)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _quit_on_interrupt(signum, frame) -> None:
    """SIGINT outside training's own handler (start-up, composition, data loading): one line,
    exit 130, a run dir holding only Hydra's files removed. It exits with `os._exit` rather than
    raising KeyboardInterrupt, which inside torch's C++ import code aborts the process (SIGABRT,
    measured)."""
    removed = False
    guard = sys.modules.get("distill_cli.config.hydra_callbacks")   # no run dir before it
    if guard is not None and hasattr(guard, "discard_refused_run_dir"):
        removed = guard.discard_refused_run_dir()
    print("interrupted (Ctrl-C)" + ("; its run dir was removed" if removed else ""),
          file=sys.stderr, flush=True)
    os._exit(130)


# Installed before anything heavy is imported (Hydra, and through the task torch, are imported
# inside the entry points), so that a Ctrl-C during start-up ends quietly instead of in a
# traceback; only when a console script or `python -m distill_cli` runs, never on a plain import.
# The training loop installs its own handler (a graceful stop with a resumable checkpoint).
ENTRY_SCRIPTS = ("distill", "distill-search", "distill-report", "distill-teachers",
                 "distill-export")
if Path(sys.argv[0]).name in ENTRY_SCRIPTS or sys.argv[0].endswith("distill_cli/__main__.py"):
    signal.signal(signal.SIGINT, _quit_on_interrupt)

from distill_cli.config.paths import CONF_DIR, CONF_PACKAGE  # noqa: E402

_task_started = False


def _run_task(task, cfg):
    """Run a Hydra task and return its result; user errors exit 2 with one paragraph,
    interruptions with their code."""
    global _task_started
    _task_started = True
    from distill_cli.config.targets import check_config
    from distill_cli.errors import UserError, exit_with
    from distill_cli.training.distributed import join_submitit_tasks
    from distill_cli.training.run import RunInterrupted

    try:
        join_submitit_tasks()   # a SLURM / local-array job of N tasks: N DDP ranks
        check_config(cfg)   # a sweep job's config is composed by its launcher, not by Hydra.run
        return task(cfg)
    except UserError as err:
        from distill_cli.config.hydra_callbacks import discard_refused_run_dir
        discard_refused_run_dir()
        exit_with(err)
    except RunInterrupted as stop:
        sys.exit(stop.exit_code)


def _distill_app():
    import hydra

    @hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="config")
    def _distill(cfg) -> float | None:
        """One job. Returns the run's objective for a Hydra sweeper (Optuna reads it): the
        task's selection metric on VALIDATION, `best/val/<Task.selection_metric>` (val acc1
        for classification; higher is better) — never a test metric (the honest protocol). A
        self-distillation run returns its final generation's. None when the run has no
        summary."""
        from distill_cli import keys
        from distill_cli.config.build import build_task
        from distill_cli.training.launch import launch

        summary = _run_task(launch, cfg)
        metric = keys.join(keys.BEST_VAL, build_task(cfg.task).selection_metric)
        value = summary.get(metric) if isinstance(summary, dict) else None
        return None if value is None else float(value)

    return _distill


def _search_app():
    import hydra

    @hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="search")
    def _search(cfg) -> None:
        from distill_cli.search.student_search import search
        _run_task(search, cfg)

    return _search


def _check_targets_on_composition() -> None:
    """Hydra builds the `hydra.callbacks`, the launcher, the sweeper and the logging handlers of
    a composed config itself, before any task code runs: check every composed config against
    the allow-list (config/targets.py) the moment Hydra composes it. `Hydra.compose_config` is
    the one method every mode (run, -m, --cfg, --info) composes through (hydra-core 1.3.8)."""
    from hydra._internal.hydra import Hydra

    from distill_cli.config.targets import check_config
    from distill_cli.errors import UserError, exit_with

    compose = Hydra.compose_config
    if getattr(compose, "checks_targets", False):
        return

    def compose_and_check(self, *args, **kwargs):
        cfg = compose(self, *args, **kwargs)
        try:
            check_config(cfg)
        except UserError as err:
            exit_with(err)
        return cfg

    compose_and_check.checks_targets = True
    Hydra.compose_config = compose_and_check


def _composition_errors_exit_2(main) -> None:
    _check_targets_on_composition()
    try:
        main()
    except SystemExit as exc:
        # Hydra reports composition errors (unknown group option, bad override) itself and
        # exits 1 before our task starts: those are user errors, so exit 2.
        if exc.code == 1 and not _task_started:
            sys.exit(2)
        raise


def _refuse_null_groups(argv: list[str]) -> None:
    """`recipe=null` (any config group set to null) makes Hydra fail with a traceback before it
    can report the override: say what to do instead, exit 2."""
    from distill_cli.errors import UserError, exit_with

    for arg in argv:
        group, _, value = arg.lstrip("+~").partition("=")
        if value == "null" and (Path(CONF_DIR) / group).is_dir():
            exit_with(UserError(f"`{group}=null` is not an option of the config group `{group}`",
                                group, f"Leave `{group}` out to get its default, or pick one of "
                                "the options `distill --help` lists"))


# `hydra/sweeper=` options that need the `hydra-optuna-sweeper` plugin (conf/hydra/sweeper/).
OPTUNA_SWEEPERS = ("optuna", "optuna_task")


def _check_sweeper(argv: list[str]) -> None:
    """`hydra/sweeper=optuna` without the plugin is a composition error that names no package,
    and with it Optuna MINIMISES by default while a job returns val acc1: say what to do, exit 2
    (before Hydra creates a sweep dir)."""
    import importlib.util

    from distill_cli.errors import UserError, exit_with

    choice = next((a.partition("=")[2] for a in argv
                   if a.lstrip("+").partition("=")[0] == "hydra/sweeper"), None)
    if choice not in OPTUNA_SWEEPERS:
        return
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        exit_with(UserError(
            f"`hydra/sweeper={choice}` needs Hydra's Optuna sweeper plugin, which is not "
            "installed", "hydra/sweeper", "Install the `sweep` extra: `pip install -e '.[sweep]'` "
            "in a checkout (`make install` does it) or `pip install 'distill_cli[sweep]'` "
            "(hydra-optuna-sweeper with pinned optuna, sqlalchemy and alembic)"))
    if choice == "optuna" and not any(a.startswith("hydra.sweeper.direction=") for a in argv):
        exit_with(UserError(
            "Optuna minimises by default, but each `distill` job returns the task's validation "
            "selection metric (val acc1), where higher is better", "hydra.sweeper.direction",
            "Use `hydra/sweeper=optuna_task` (Optuna, maximising), or add "
            "`hydra.sweeper.direction=maximize`"))


def _add_overrides(extra: list[str]) -> None:
    """Insert overrides into sys.argv next to the user's: Hydra's parser takes the overrides as
    ONE run of positional arguments, so they go right before the first one (or at the end)."""
    at = next((i for i, a in enumerate(sys.argv[1:], 1)
               if "=" in a and not a.startswith("-")), len(sys.argv))
    sys.argv[at:at] = extra


def _join_torchrun(argv: list[str]) -> None:
    """Under torchrun every rank composes the same job: the same launch time (so one run dir:
    rank 0's clock, broadcast), and only rank 0 writes Hydra's files and log into it."""
    from distill_cli.config.resolvers import LAUNCH_TIME_ENV
    from distill_cli.errors import UserError, exit_with
    from distill_cli.training.distributed import init_world, launched_by_torchrun

    if not launched_by_torchrun():
        return
    if any(a in ("-m", "--multirun") for a in argv):
        exit_with(UserError("A sweep (-m) cannot run inside torchrun: every rank would launch "
                            "the whole sweep", "-m", "Run one job per torchrun, or sweep with "
                            "`distill -m hydra/launcher=slurm` whose jobs start the ranks"))
    import datetime

    world = init_world()
    os.environ[LAUNCH_TIME_ENV] = world.broadcast(datetime.datetime.now().isoformat())
    if not world.is_main:
        _add_overrides(["hydra.output_subdir=null", "hydra/job_logging=disabled",
                        "hydra/hydra_logging=disabled"])


#: launchers whose jobs may be requeued or re-submitted into the same run dir
REQUEUING_LAUNCHERS = ("hydra/launcher=slurm", "hydra/launcher=local_array")


def _continue_requeued_jobs(argv: list[str]) -> None:
    """A requeued job (same overrides, same run dir) must continue its run, and a re-submitted
    sweep must skip the runs that finished: `trainer.resume=if_any` unless the user chose."""
    if any(a in REQUEUING_LAUNCHERS for a in argv) and not any(
            a.startswith("trainer.resume=") for a in argv):
        _add_overrides(["trainer.resume=if_any"])


def distill_main() -> None:
    from distill_cli.runs import allocator

    allocator.tune()   # before torch allocates anything (runs/allocator.py: why)
    _join_torchrun(sys.argv[1:])
    _refuse_null_groups(sys.argv[1:])
    _check_sweeper(sys.argv[1:])
    _continue_requeued_jobs(sys.argv[1:])
    _composition_errors_exit_2(_distill_app())


def search_main() -> None:
    """`distill-search`: DisWOT training-free student search (distill_cli/search.py)."""
    _composition_errors_exit_2(_search_app())


def report_main(argv: list[str] | None = None) -> None:
    """`distill-report`: a table over sweep/run dirs (see distill_cli/report.py). Plain
    argparse, not Hydra: it reads finished runs and has no config of its own."""
    import argparse

    from distill_cli.errors import UserError
    from distill_cli.io import blocking_file
    from distill_cli.reporting.report import FORMATS, MAIN_METRIC, report

    parser = argparse.ArgumentParser(
        prog="distill-report", description="Pool seeds per configuration: mean ± std, gain "
        "over the CE baseline, runs that did not finish.")
    parser.add_argument("paths", nargs="+", help="sweep dirs, run dirs (searched recursively)")
    parser.add_argument("--metric", default=MAIN_METRIC, help="summary.json key to rank and "
                        "plot (default: %(default)s)")
    parser.add_argument("--sort", help="column to sort by, best first (default: --metric); "
                        "aliases: best, last, ece, teacher, wall")
    parser.add_argument("--reverse", action="store_true", help="reverse the sort order")
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument("--plot", metavar="OUT.png", help="also write a bar chart")
    parser.add_argument("--grids", metavar="OUT.png", help="also write each configuration's "
                        "sample grid (diffusion) or synthetic set (dataset distillation) side "
                        "by side")
    args = parser.parse_args(argv)
    try:
        for flag, path in (("--plot", args.plot), ("--grids", args.grids)):
            if path and (blocker := blocking_file(path)) is not None:
                raise UserError(f"Cannot write {flag} {path}: {blocker} is a file", flag,
                                "Pass a path in a directory")
        report(args.paths, args.metric, args.sort, args.reverse, args.format, args.plot,
               args.grids)
    except UserError as err:
        print("error: " + " ".join(err.paragraph().split()), file=sys.stderr, flush=True)
        sys.exit(2)


def teachers_main(argv: list[str] | None = None) -> None:
    """`distill-teachers list|prune`: inspect or clean the teacher store."""
    import argparse

    from distill_cli.errors import UserError
    from distill_cli.teachers.store import default_root
    from distill_cli.reporting.tracking import make_console
    from distill_cli.teachers.commands import list_stored, prune_stored

    parser = argparse.ArgumentParser(prog="distill-teachers",
                                     description="The teacher store: teachers trained once and "
                                     "reused by every run that shares their key.")
    parser.add_argument("--root", default=None, help="store root (default: $DISTILL_HOME or "
                        "~/.cache/distill_cli)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show stored teachers")
    prune = sub.add_parser("prune", help="remove unfinished builds, and the given entries")
    prune.add_argument("keys", nargs="*", help="entry keys to remove")
    prune.add_argument("--all", action="store_true", help="remove every stored teacher")
    args = parser.parse_args(argv)
    root = args.root or default_root()
    try:
        if args.command == "list":
            table, entries, leftovers = list_stored(root)
            make_console().print(table)
            print(f"{len(entries)} teacher(s); {len(leftovers)} unfinished build(s)"
                  + (" (the next run that needs one continues it; `distill-teachers prune` "
                     "removes them)" if leftovers else ""))
        else:
            removed = prune_stored(root, args.keys, args.all)
            print("removed: " + (", ".join(removed) if removed else "nothing"))
    except UserError as err:
        print("error: " + " ".join(err.paragraph().split()), file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    distill_main()
