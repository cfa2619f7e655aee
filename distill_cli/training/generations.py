"""Self-distillation generations (Borup & Andersen) — METHODS.md "Self-distillation with
ground-truth guidance": `self_distill.generations=G` (G >= 1) with `loss=self_distill`.

    <run_dir>/gen0/        the student's architecture trained on labels, seed = seed: the
                           same loss at α = 1 (the authors; `loss.gen0=ce`: CE, ours before)
    <run_dir>/gen<g>/      g = 1..G: the same architecture, fresh init (seed = seed + g), distilled
                           with loss=self_distill at α_g from gen<g-1>/checkpoints/last.pt (the
                           authors hand on the final model; `loss.teacher_weights=best`: best.pt)
    <run_dir>/gen<g>_alpha1/, gen<g>_alpha0/   only with alpha=auto: the two fits that pick α_g
    <run_dir>/summary.json every generation's best/last test accuracy (`generations`), and the
                           final generation's metrics as the run's own (`best/test/acc1`, ...)

Each generation is an ordinary run through `launcher.run` (checkpoints, metrics, summary, W&B
run); every generation sees the same data order (`data_seed` is fixed), only the initialisation
changes. Every generation (the α fits too) trains with `loss.optimizer` / `loss.scheduler` when
they are set — the authors' Adam(lr 1e-3), no weight decay, constant lr, by default — in place of
the run's `optimizer` / `scheduler` groups; setting those groups on the command line as well is
refused (which one would win is not obvious): pass `loss.optimizer=null` to use them.
`trainer.resume=auto` continues: finished generations are kept, an interrupted one is resumed,
the rest start fresh.

alpha=auto (OUR reconstruction of the per-generation choice; label results so): a generation's
fit is treated as linear in its targets, f(α) ≈ α·f₁ + (1−α)·f₀, where f₁ and f₀ are the softmax
VALIDATION predictions (the weights a generation hands on: `loss.teacher_weights`) of the α=1
and α=0 fits trained for that generation (same init and data order). Minimising ‖y − f(α)‖² over α (y one-hot val labels, sums over samples and
classes) gives α* = ⟨f₁−f₀, y−f₀⟩ / ‖f₁−f₀‖², clipped to [0, 1]; the generation is then trained
at α*. This costs two extra trainings per generation.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from distill_cli import keys
from distill_cli.runs import checkpoint
from distill_cli.config.build import TEACHER_SOURCE_KEYS, build_data
from distill_cli.tasks.classification.evaluate import predict
from distill_cli.errors import UserError
from distill_cli.losses.self_distill import SelfDistill, check_procedure
from distill_cli.runs.directory import RunFinished, check_run_dir
from distill_cli.teachers.load import frozen_from_checkpoint
from distill_cli.io import read_json, write_json
from distill_cli.training.plan import pick_device, validate
from distill_cli.training.run import RunInterrupted, run

CE_LOSS = {"_target_": "distill_cli.losses.ce.CrossEntropy", "label_smoothing": 0.0}
SELF_DISTILL_TARGET = f"{SelfDistill.__module__}.{SelfDistill.__qualname__}"


def optimal_alpha(f0: torch.Tensor, f1: torch.Tensor, y: torch.Tensor) -> float:
    """α* = ⟨f₁−f₀, y−f₀⟩ / ‖f₁−f₀‖² (float64, over all elements), clipped to [0, 1]; 0.5 when
    the two fits predict the same (α then changes nothing)."""
    f0, f1, y = (torch.as_tensor(a, dtype=torch.float64) for a in (f0, f1, y))
    d = f1 - f0
    denom = float((d * d).sum())
    if denom == 0.0:
        return 0.5
    return min(max(float((d * (y - f0)).sum()) / denom, 0.0), 1.0)


def check_options(cfg: DictConfig) -> tuple[int, float | str]:
    generations = OmegaConf.select(cfg, "self_distill.generations")
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 0:
        raise UserError(f"self_distill.generations={generations!r} must be an integer >= 0",
                        "self_distill.generations", "Use e.g. self_distill.generations=2")
    if str(cfg.loss.get("_target_")) != SELF_DISTILL_TARGET:
        raise UserError(f"self_distill.generations={generations} trains generations with "
                        "loss=self_distill, but another loss was given", "loss",
                        "Add loss=self_distill (or set self_distill.generations=0)")
    alpha = cfg.loss.alpha
    if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                            or not 0.0 <= float(alpha) <= 1.0):
        raise UserError(f"self_distill.alpha={alpha!r} must be in [0, 1] or auto",
                        "self_distill.alpha", "Use e.g. 0.5, or auto")
    if cfg.trainer.resume not in (None, "auto", "if_any"):
        raise UserError("A self-distillation run continues as a whole, not from one checkpoint",
                        "trainer.resume", "Use trainer.resume=auto with hydra.run.dir=<the run>")
    loss = cfg.loss
    check_procedure(loss.get("gen0", "mse"), loss.get("weight_penalty", 0.0),
                    loss.get("teacher_weights", "last"))
    for group in ("optimizer", "scheduler"):
        clash = [o for o in command_line_overrides() if _sets(o, group)]
        if loss.get(group) is not None and clash:
            raise UserError(f"{' '.join(clash)} was given, but self-distillation generations "
                            f"train with loss.{group} (the authors' procedure)", f"loss.{group}",
                            f"Pass loss.{group}=null to train every generation with the "
                            f"`{group}` group, or drop {' '.join(clash)}")
    return generations, alpha


def command_line_overrides() -> list[str]:
    """This job's command-line overrides (Hydra's `overrides.task`), or [] outside a Hydra
    job (tests call `launch` with a composed config)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _sets(override: str, group: str) -> bool:
    """Whether an override like `optimizer=adamw`, `optimizer.lr=0.1` or `~optimizer.nesterov`
    sets the student's `group` (not `optimizer@teacher.train.optimizer=...`)."""
    key = override.lstrip("~+").split("=", 1)[0]
    return key == group or key.startswith(group + ".")


def generation_config(cfg: DictConfig, g: int, alpha: float | None, teacher: Path | None
                      ) -> DictConfig:
    """Generation g's run config: seed + g, the student's architecture, `loss.optimizer` /
    `loss.scheduler` when set; gen0 without a teacher (the loss at α = 1, or CE with
    `loss.gen0=ce`), later ones loss=self_distill at `alpha` from the `teacher` checkpoint."""
    c = OmegaConf.to_container(cfg, resolve=True)   # fixes data_seed: one data order for all
    source = {k: v for k, v in c["teacher"].items() if k in TEACHER_SOURCE_KEYS}
    c["seed"] = int(c["seed"]) + g
    c["self_distill"] = {"generations": 0, "alpha": alpha}
    for group in ("optimizer", "scheduler"):
        if c["loss"].get(group) is not None:
            c[group] = c["loss"][group]
    if teacher is None:
        c["loss"] = (dict(CE_LOSS) if c["loss"].get("gen0", "mse") == "ce"
                     else {**c["loss"], "alpha": 1.0})
        c["teacher"] = {**source, "_target_": None, "arch": None, "checkpoint": None}
    else:
        c["loss"]["alpha"] = alpha
        c["teacher"] = {**source, **c["student"], "checkpoint": str(teacher)}
    return OmegaConf.create(c)


def handed_on(gdir: Path, cfg: DictConfig) -> Path:
    """The checkpoint a generation hands on (`loss.teacher_weights`): last.pt (the authors'
    final model) or best.pt."""
    return gdir / "checkpoints" / f"{cfg.loss.get('teacher_weights', 'last')}.pt"


def run_generations(cfg: DictConfig, run_dir=None, tty=None, data=None) -> dict:
    validate(cfg)
    generations, alpha = check_options(cfg)
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    try:   # never overwrite; resume=auto needs a run
        check_run_dir(run_dir, cfg.trainer.resume)
    except RunFinished as done:   # resume=if_any on a finished run: nothing to do
        return done.summary
    device = pick_device(cfg.trainer.device)
    data = data if data is not None else build_data(cfg.dataset).to(device)

    def once(gcfg: DictConfig, gdir: Path) -> dict:
        done = read_json(gdir / "summary.json") or {}
        if done.get(keys.STATUS) == "finished":
            return done
        gcfg.trainer.resume = "auto" if (gdir / "checkpoints" / "last.pt").is_file() else None
        return run(gcfg, gdir, tty=tty, data=data)

    def val_probs(gdir: Path) -> torch.Tensor:
        ckpt = checkpoint.load(handed_on(gdir, cfg), "self_distill.alpha")
        model = frozen_from_checkpoint(cfg.student, ckpt, data, device, "self_distill.alpha")
        logits, _ = predict(model, data.val, int(cfg.trainer.eval_batch_size), device,
                            cfg.trainer.precision)
        return F.softmax(logits.double(), dim=1)

    summary = {keys.STATUS: "running", keys.RUN_DIR: str(run_dir), "self_distill/generations":
               generations, "self_distill/alpha": alpha, keys.GENERATIONS: []}
    write_json(run_dir / "summary.json", summary)
    walls, teacher = [], None
    try:
        for g in range(generations + 1):
            a = None if g == 0 else alpha
            if a == "auto":
                fits = {}
                for fit_alpha in (1.0, 0.0):
                    fdir = run_dir / f"gen{g}_alpha{int(fit_alpha)}"
                    walls.append(once(generation_config(cfg, g, fit_alpha, teacher), fdir)
                                 [keys.WALL_S])
                    fits[fit_alpha] = val_probs(fdir)
                y = F.one_hot(data.val.targets.long(), data.num_classes).to(fits[1.0])
                a = optimal_alpha(fits[0.0], fits[1.0], y)
            gdir = run_dir / f"gen{g}"
            final = once(generation_config(cfg, g, a, teacher), gdir)
            walls.append(final[keys.WALL_S])
            summary[keys.GENERATIONS].append({
                "generation": g, keys.RUN_DIR: str(gdir), "alpha": a, keys.SEED: int(cfg.seed) + g,
                keys.TEACHER_CHECKPOINT: None if teacher is None else str(teacher),
                **{k: final.get(k) for k in (keys.BEST_VAL_ACC1, keys.BEST_TEST_ACC1,
                                             keys.LAST_TEST_ACC1, keys.BEST_TEST_ECE)}})
            write_json(run_dir / "summary.json", summary)
            teacher = handed_on(gdir, cfg)
    except RunInterrupted as stop:
        summary[keys.STATUS] = "interrupted"
        write_json(run_dir / "summary.json", summary)
        print(f"self-distillation interrupted; resume the whole run with hydra.run.dir={run_dir} "
              "trainer.resume=auto", flush=True)
        raise RunInterrupted(stop.exit_code, run_dir) from None
    except BaseException as exc:
        summary.update({keys.STATUS: "failed", keys.ERROR: f"{type(exc).__name__}: {exc}"[:500]})
        write_json(run_dir / "summary.json", summary)
        raise
    # the final generation's metrics are the run's own
    summary = {**final, **summary, keys.STATUS: "finished", keys.WALL_S: sum(walls)}
    write_json(run_dir / "summary.json", summary)
    return summary
