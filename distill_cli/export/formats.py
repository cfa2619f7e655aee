"""The four export formats: how each is written, and how each is loaded back WITHOUT building
the network through distill_cli where the format allows it (that loader is also what the
export verifies itself with, so a written file is known to load and to compute the runner's
logits).

- torchscript (.pt): torch.jit.trace (deprecated by PyTorch 2.x) → torch.jit.load
- export (.pt2): torch.export.export + torch.export.save → torch.export.load(path).module()
- onnx (.onnx, one file): torch.onnx.export(dynamo=True) → onnxruntime.InferenceSession
- safetensors (.safetensors, weights only): safetensors.torch.save_file → `load_safetensors`,
  which rebuilds the architecture with distill_cli (this format needs the package)

Every graph format has a dynamic batch axis (dim 0); the other dims are the run's input shape.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from torch import nn

INPUT, OUTPUT = "input", "logits"   # the ONNX graph's input/output names


@contextlib.contextmanager
def quiet():
    """torch.export prints whole graphs when it fails and torch.onnx prints its progress, with
    print() and from C++: silence file descriptors 1 and 2, not just sys.stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        # torch.jit's FutureWarnings and TracerWarnings: the verification decides, not a warning
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _batch_dim():
    # the example batch is 2: torch.export specialises a dimension whose example size is 0 or 1
    return ({0: torch.export.Dim("batch")},)


# --------------------------------------------------------------------------- writers
def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    with quiet():
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))
    return {}


def write_export(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    with quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim())
        torch.export.save(program, str(path))
    return {}


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    with quiet():
        # external_data=False: one self-contained file (weights inside; fine below 2 GB)
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_shapes=_batch_dim(), dynamo=True,
                          external_data=False, verbose=False)
    import onnx

    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)
    return {"onnx": {"input": INPUT, "output": OUTPUT, "opset": opset}}


def write_safetensors(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt"})
    return {}


# --------------------------------------------------------------------------- loaders
def load_torchscript(path: Path, info: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    with quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    return module


def load_export(path: Path, info: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.export.load(str(path)).module()


def load_onnx(path: Path, info: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {INPUT: x.cpu().numpy()})[0])


def load_safetensors(path: str | Path, info: dict | None = None) -> nn.Module:
    """A `.safetensors` export as an eval-mode module. The file holds weights only: the network
    is rebuilt from the sidecar JSON's `model_config` with distill_cli's model zoo (so this
    format needs the package), BatchNorm folded first when the export folded it (the same
    deterministic fold, models/fold.py, gives the same module tree), then the weights load."""
    from safetensors.torch import load_file

    from distill_cli.config.build import build_model
    from distill_cli.io import read_json
    from distill_cli.models.fold import fold_batchnorm

    path = Path(path)
    info = info if info is not None else read_json(Path(f"{path}.json"))
    if not info:
        raise FileNotFoundError(f"{path}.json (the export's sidecar) is missing or unreadable")
    shape = SimpleNamespace(num_classes=int(info["num_classes"]),
                            input_shape=tuple(int(s) for s in info["input_shape"]))
    model = build_model(OmegaConf.create(info["model_config"]), "student", shape).eval()
    if info.get("bn_folded"):
        fold_batchnorm(model)
    model.load_state_dict(load_file(str(path)))
    return model.requires_grad_(False)


@dataclass(frozen=True)
class Format:
    name: str
    ext: str
    needs: tuple[str, ...]        # importable modules the format needs (the `export` extra)
    write: Callable[[nn.Module, torch.Tensor, Path], dict]
    load: Callable[[Path, dict], Callable[[torch.Tensor], torch.Tensor]]
    usage: str                    # how a user loads it (into the sidecar JSON)
    needs_distill_cli: bool = False


FORMATS = {f.name: f for f in (
    Format("torchscript", "pt", (), write_torchscript, load_torchscript,
           "torch.jit.load(path)(x)"),
    Format("export", "pt2", (), write_export, load_export,
           "torch.export.load(path).module()(x)"),
    Format("onnx", "onnx", ("onnx", "onnxscript", "onnxruntime"), write_onnx, load_onnx,
           "onnxruntime.InferenceSession(path).run(None, {'input': x})[0]"),
    Format("safetensors", "safetensors", ("safetensors",), write_safetensors, load_safetensors,
           "distill_cli.export.load_safetensors(path)(x)  # rebuilds the architecture with "
           "distill_cli, then loads the weights", needs_distill_cli=True),
)}


def missing_modules(fmt: Format) -> list[str]:
    return [m for m in fmt.needs if importlib.util.find_spec(m) is None]


def run_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn` over `x` in batches of 1, 2 and the rest: exercises the dynamic batch axis and, for a
    trace, inputs other than the one it recorded."""
    cuts = [c for c in (1, 3) if c < len(x)]
    with torch.no_grad():
        return torch.cat([fn(part).float() for part in torch.tensor_split(x, cuts)])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| over the logit scale (max |ref|, at least 1)."""
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1.0))
