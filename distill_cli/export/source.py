"""What an export starts from: a finished (or interrupted) `distill` run dir, read back.

A run dir holds `checkpoints/best.pt` / `last.pt` (runs/checkpoint.py: the student's state dict
plus the `model_config` and `data` that rebuild it) and `summary.json`. The student is rebuilt
with the same `build_model` the runner used, and the run's own dataset is built from the
checkpoint's resolved config: its test split gives the inputs the export is verified on, and
its normalisation is what a user must apply to raw images (the runner normalises inside the
data pipeline, so the exported network expects already-normalised input).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from torch import nn

from distill_cli import keys
from distill_cli.config.build import build_data, build_model
from distill_cli.errors import UserError
from distill_cli.io import read_json
from distill_cli.runs import checkpoint

WEIGHTS = {"best": "best.pt", "last": "last.pt"}
# The summary key of each choice's test top-1 (percent), written by the runner's final evaluation.
TEST_ACC1 = {"best": keys.BEST_TEST_ACC1, "last": keys.LAST_TEST_ACC1}
CLASSIFICATION = "distill_cli.tasks.classification.task.ClassificationTask"


@dataclass
class Source:
    run_dir: Path
    weights: str           # best | last
    ckpt: dict             # the checkpoint, as runs/checkpoint.py loaded it
    summary: dict          # summary.json ({} when missing)


def open_run(run_dir: str | Path, weights: str) -> Source:
    """The run dir's checkpoint for `weights`; every way this can be wrong is a UserError."""
    if weights not in WEIGHTS:
        raise UserError(f"--weights {weights} is not a choice", "--weights",
                        "Use --weights best (the val-selected checkpoint, default) or "
                        "--weights last (the final weights)")
    run_dir = Path(run_dir).expanduser()
    summary = (read_json(run_dir / "summary.json") or {}) if run_dir.is_dir() else {}
    ckpt_dir = run_dir / "checkpoints"
    if not run_dir.is_dir() or not (ckpt_dir.is_dir() or summary):
        raise UserError(f"{run_dir} is not a distill run dir (no checkpoints/ or summary.json)",
                        "RUN_DIR", "Pass the directory a `distill` run wrote (it holds "
                        "checkpoints/best.pt), e.g. outputs/<date>/<time>")
    path = ckpt_dir / WEIGHTS[weights]
    if not path.is_file():
        raise UserError(f"{run_dir} has no checkpoints/{WEIGHTS[weights]}", "--weights",
                        _missing_fix(run_dir, summary, weights))
    ckpt = checkpoint.load(path, "RUN_DIR")
    target = (ckpt.get("config") or {}).get("task", {}).get("_target_", CLASSIFICATION)
    if target != CLASSIFICATION:
        raise UserError(f"{run_dir} trained a `{target}` student; distill-export writes "
                        "classifiers only", "RUN_DIR", "Export a classification run")
    return Source(run_dir, weights, ckpt, summary)


def _missing_fix(run_dir: Path, summary: dict, weights: str) -> str:
    if keys.GENERATIONS in summary:   # self-distillation: each generation is a run of its own
        gens = sorted(run_dir.glob("gen[0-9]*"), key=lambda p: p.name)
        last = gens[-1] if gens else run_dir / "gen<G>"
        return f"This is a self-distillation run: export one generation's run dir, e.g. {last}"
    if weights == "best" and (run_dir / "checkpoints" / WEIGHTS["last"]).is_file():
        return ("The run stopped before its first validation: pass --weights last, or resume "
                "the run (trainer.resume=auto) to get a best.pt")
    return "Point it at a run that trained at least one epoch"


def build_student(src: Source) -> nn.Module:
    """The student with the chosen weights, in eval mode and frozen (what the runner evaluates)."""
    data = src.ckpt["data"]
    shape = SimpleNamespace(num_classes=int(data["num_classes"]),
                            input_shape=tuple(int(s) for s in data["input_shape"]))
    model = build_model(OmegaConf.create(src.ckpt["model_config"]), "student", shape)
    try:
        model.load_state_dict(src.ckpt["model"])
    except RuntimeError as exc:   # the zoo's code changed since the run trained
        arch = src.ckpt["model_config"].get("arch")
        raise UserError(f"The checkpoint's weights do not fit `{arch}` as this distill_cli "
                        f"builds it ({str(exc).splitlines()[0][:160]})",
                        "RUN_DIR", "Export with the distill_cli version that trained the run "
                        f"(git {src.ckpt.get('git', 'unknown')})") from None
    return model.eval().requires_grad_(False)


def run_data(src: Source):
    """The run's dataset, built exactly as the runner built it (CPU)."""
    node = OmegaConf.create(src.ckpt["config"]["dataset"])
    try:
        return build_data(node)
    except UserError as err:
        raise UserError(f"The run's dataset cannot be loaded; the export reads its "
                        f"normalisation and verifies the exported network on its test split "
                        f"({err.what})", "RUN_DIR", err.fix or "Make the dataset available "
                        "where the run found it (e.g. `make data`)") from None


def verification_inputs(data, n: int = 64) -> torch.Tensor:
    """The first `n` test inputs, normalised as the runner feeds them to the network."""
    return next(iter(data.test.eval_batches(n))).x.float().contiguous()


def preprocessing(data) -> dict:
    """What turns a raw sample into the network's input: `x = (raw * scale - mean) / std` per
    channel, after `resize` for an image folder; channels first."""
    split = data.test
    norm = data.identity.get("normalization", {})
    mean = list(getattr(split, "mean", None) or norm.get("mean"))
    std = list(getattr(split, "std", None) or norm.get("std"))
    pixels = getattr(split, "x", None)
    # uint8 images are divided by 255 (data/augment.py `normalize`; torchvision's ToTensor for
    # an image folder); float signals (MNIST-1D) are taken as they are
    scale = 1.0 / 255.0 if pixels is None or pixels.dtype == torch.uint8 else 1.0
    out = {"mean": mean, "std": std, "scale": scale, "layout": "channels first (C, H, W)",
           "raw": "uint8 pixels 0..255" if scale != 1.0 else "float32 values as stored",
           "formula": "input[c] = (raw[c] * scale - mean[c]) / std[c]", "resize": None}
    if data.identity.get("name") == "imagefolder":
        from distill_cli.data.imagefolder import RESIZE_RATIO

        size = int(data.identity["image_size"])
        out["resize"] = {"shorter_side": round(size / RESIZE_RATIO), "center_crop": size,
                         "interpolation": "bilinear, antialiased (torchvision Resize)",
                         "color": "RGB"}
    return out


def runner_test_acc1(src: Source) -> float | None:
    """The runner's test top-1 (percent) of the exported weights, None if it never evaluated."""
    value = src.summary.get(TEST_ACC1[src.weights])
    return float(value) if isinstance(value, (int, float)) else None
