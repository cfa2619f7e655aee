"""`distill-export RUN_DIR --format torchscript|export|onnx|safetensors`: the distilled student
of a `distill` run as a file that runs without the runner, plus a sidecar JSON
(`<file>.json`) with what a user needs to feed it raw inputs: input shape, the runner's
per-channel normalisation, class names, and where the weights came from.

Every export is verified before anything is written: the file is loaded back with its format's
own loader (formats.py) and must reproduce the runner's logits of the same weights on the
run's test inputs; a format that cannot hold the student (e.g. a data-dependent branch in its
forward) is a UserError naming a format that can, and the output dir is left untouched.

Entry point only (like cli.py): it sits on the top floor and reads the floors below.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from distill_cli import __version__, keys
from distill_cli.errors import UserError, exit_with
from distill_cli.export.formats import (FORMATS, load_safetensors, missing_modules,
                                        relative_error, run_batches)
from distill_cli.export.source import (WEIGHTS, build_student, open_run, preprocessing,
                                       run_data, runner_test_acc1, verification_inputs)
from distill_cli.io import atomic_write_bytes, write_json
from distill_cli.models.fold import fold_batchnorm

__all__ = ["FORMATS", "export_run", "load_safetensors", "main"]

# Largest accepted |export - runner| over the logit scale in the self-check. A faithful export
# differs by float rounding (~1e-6 measured on digits, folded or not); a wrongly recorded branch
# by O(1). The tests hold the exports to 1e-5.
TOLERANCE = 1e-3
SAFETENSORS_INSTEAD = ("Use --format safetensors: it stores the weights and runs the model's own "
                       "Python forward (rebuilt with distill_cli), so any control flow works")


def export_run(run_dir: str | Path, formats: str | list[str], weights: str = "best",
               out: str | Path | None = None, fold_bn: bool = False) -> list[Path]:
    """Export the run's student in each format into `out` (default `<run_dir>/export`);
    returns the files written (each with its `<file>.json` sidecar)."""
    names = check_formats(formats)
    src = open_run(run_dir, weights)
    out = Path(out).expanduser() if out is not None else src.run_dir / "export"
    check_out(out)
    data = run_data(src)
    model = build_student(src)
    x = verification_inputs(data)
    reference = run_batches(model, x)   # the runner's network, unfolded: its logits
    exported, folded = model, 0
    if fold_bn:
        exported = copy.deepcopy(model)
        folded = fold_batchnorm(exported)
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in exported.modules())
    if fold_bn and left:
        print(f"note: {left} BatchNorm layer(s) could not be folded (no conv feeds them alone, "
              "or torch.fx cannot trace the model); they stay as they are", file=sys.stderr)
    base = sidecar(src, data, folded, left)
    stem = f"student-{weights}" + ("-bnfold" if fold_bn else "")
    example = torch.cat([x, x])[:2]   # batch 2: the batch axis stays dynamic
    with tempfile.TemporaryDirectory(prefix="distill-export-") as tmp:
        staged = [stage(name, exported, example, x, reference, Path(tmp) / stem, base)
                  for name in names]
        written = []
        for path, info in staged:   # all verified: only now is anything written to `out`
            target = out / path.name
            with open(path, "rb") as src_fh:
                atomic_write_bytes(target, lambda fh: shutil.copyfileobj(src_fh, fh))
            write_json(Path(f"{target}.json"), info)
            written.append(target)
    return written


def check_formats(formats: str | list[str]) -> list[str]:
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats)]
    unknown = [f for f in names if f not in FORMATS] or ([] if names else ["(none)"])
    if unknown:
        raise UserError(f"Unknown export format {', '.join(map(repr, unknown))}", "--format",
                        f"Use one or more of {', '.join(FORMATS)}, comma-separated")
    for name in names:
        missing = missing_modules(FORMATS[name])
        if missing:
            raise UserError(f"--format {name} needs {', '.join(missing)}, which is not installed",
                            "--format", "Install the export extra: `pip install -e '.[export]'` "
                            "in a checkout (`make install` does it) or `pip install "
                            "'distill_cli[export]'`")
    return list(dict.fromkeys(names))


def check_out(out: Path) -> None:
    """Refuse an --out that cannot become a directory before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory", "--out",
                        "Pass a directory (it is created if missing)")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir() or not _writable(parent):
        raise UserError(f"--out {out}: {parent} is not a writable directory", "--out",
                        "Pass a directory you can write to")


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def sidecar(src, data, folded: int, left: int) -> dict:
    """The JSON every export carries (the format-specific fields are added per file)."""
    state = src.ckpt.get("state") or {}
    return {
        "task": "classification", "source_run": str(src.run_dir.resolve()),
        "weights": src.weights, "checkpoint": f"checkpoints/{WEIGHTS[src.weights]}",
        "epoch": state.get("epoch"), "run_status": src.summary.get(keys.STATUS),
        # the runner's own test top-1 of these weights (percent), from summary.json
        "test_acc1": runner_test_acc1(src),
        "arch": src.ckpt["model_config"].get("arch"), "model_config": src.ckpt["model_config"],
        "dataset": data.name, "num_classes": int(data.num_classes),
        "input_shape": [int(s) for s in data.input_shape], "batch_axis": 0, "dtype": "float32",
        "class_names": list(data.class_names) if data.class_names is not None else None,
        "preprocessing": preprocessing(data),
        "output": "logits [batch, num_classes]; softmax gives probabilities, argmax indexes "
                  "class_names",
        "bn_folded": folded, "bn_left": left,
        "torch_version": torch.__version__, "distill_cli_version": __version__,
        "git": src.ckpt.get("git"),
    }


def stage(name: str, model: nn.Module, example: torch.Tensor, x: torch.Tensor,
          reference: torch.Tensor, stem: Path, base: dict) -> tuple[Path, dict]:
    """Write one format into the temp dir, load it back with its own loader, check its logits."""
    fmt = FORMATS[name]
    path = stem.with_name(f"{stem.name}.{fmt.ext}")
    info = {**base, "format": name, "file": path.name, "usage": fmt.usage,
            "needs_distill_cli": fmt.needs_distill_cli}
    try:
        info.update(fmt.write(model, example, path))
        out = run_batches(fmt.load(path, info), x)
    except Exception as exc:   # the exporter's own error, whatever its type
        chain = _chain(exc)
        root = chain[-1]   # torch.onnx wraps torch.export's error: the cause says why
        first = (str(root).strip().splitlines() or [""])[0][:200]
        raise UserError(f"The student ({base['arch']}) cannot be exported as {name}: "
                        f"{type(root).__name__}: {first}", "--format",
                        _instead(name, "\n".join(map(str, chain)))) from exc
    err = relative_error(out, reference) if out.shape == reference.shape else float("inf")
    if not err <= TOLERANCE:
        raise UserError(f"The {name} export of the student ({base['arch']}) computes other "
                        f"logits than the run's network (max difference {err:.3g} of the logit "
                        f"scale on {len(x)} test inputs): its forward takes data-dependent "
                        f"branches that a {name} graph cannot follow", "--format",
                        SAFETENSORS_INSTEAD if name != "safetensors" else
                        "Use --format export or --format torchscript")
    info["verified"] = {"test_inputs": len(x), "max_abs_diff_over_logit_scale": err,
                        "tolerance": TOLERANCE}
    return path, info


def _instead(name: str, error: str) -> str:
    """The format to use when `name` failed with `error`: a data-dependent branch defeats every
    graph format; anything else may be one exporter's limit."""
    if name == "safetensors":
        return "Use --format export or --format torchscript"
    if "data-dependent" in error:
        return SAFETENSORS_INSTEAD
    return f"{SAFETENSORS_INSTEAD}; or --format {'torchscript' if name == 'export' else 'export'}"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not e for e in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="distill-export", description="Write the distilled student of a `distill` run "
        "as a self-contained file with a JSON of its preprocessing; every export is loaded "
        "back and checked against the run's own logits before it is written.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run dir written by `distill`")
    parser.add_argument("--format", required=True, help="torchscript (.pt; deprecated by "
                        "PyTorch), export (.pt2, torch.export), onnx (.onnx), safetensors "
                        "(weights; needs distill_cli to rebuild the architecture); several "
                        "comma-separated")
    parser.add_argument("--weights", default="best", help="best (val-selected, default) or last")
    parser.add_argument("--out", default=None, help="output dir (default: RUN_DIR/export)")
    parser.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the "
                        "preceding convolution (inference-only; same logits up to rounding; "
                        "ONNX's exporter folds it by itself either way)")
    args = parser.parse_args(argv)
    try:
        written = export_run(args.run_dir, args.format, args.weights, args.out, args.fold_bn)
    except UserError as err:
        exit_with(err)
    for path in written:
        print(path)
