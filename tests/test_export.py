"""`distill-export` (distill_cli/export/): every format, loaded WITHOUT distill_cli where the
format allows it (torch.jit.load, torch.export.load, onnxruntime), fed raw test images through
nothing but the sidecar JSON's preprocessing, reproduces the runner's own test-set logits (the
ones behind summary.json's test acc1) within 1e-5 of the logit scale — BatchNorm folded or not;
bad input is exit 2 / UserError with nothing written; W&B gets the student as a `model` artifact.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distill_cli.config.build import build_data, build_model
from distill_cli.errors import UserError
from distill_cli.export import FORMATS, export_run, load_safetensors
from distill_cli.models.registry import ARCHS, register
from distill_cli.runs import checkpoint
from distill_cli.tasks.classification.evaluate import predict, score
from distill_cli.training.run import run

from conftest import DIGITS, make_cfg

EXPORT = str(Path(sys.executable).parent / "distill-export")
TOL = 1e-5   # max |export - runner| over the logit scale
# torch.jit.* warn that TorchScript is deprecated (the format is asked for by name)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def export_cli(*args, check_rc=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([EXPORT, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc.error = " ".join(proc.stderr.split())   # the one paragraph, unwrapped
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny digits run whose student has BatchNorm (cnn_small: conv → BN → ReLU ×3)."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    run(make_cfg(DIGITS + ["student=cnn_small", "loss=ce"]), run_dir, tty=False)
    return run_dir


# (weights, folded): best unfolded and last with BatchNorm folded, each all four formats at
# once: the first through the real `distill-export` command, the second through its function
VARIANTS = {"best": ("best", False), "last-bnfold": ("last", True)}


@pytest.fixture(scope="module")
def exports(trained) -> dict:
    proc = export_cli(trained, "--format", ",".join(FORMATS), check_rc=0)
    cli = [Path(line) for line in proc.stdout.split()]
    api = export_run(trained, list(FORMATS), weights="last", fold_bn=True)
    out = {}
    for name, files in (("best", cli), ("last-bnfold", api)):
        assert [f.suffix for f in files] == [".pt", ".pt2", ".onnx", ".safetensors"]
        out[name] = {f.suffix: f for f in files}
    return out


@pytest.fixture(scope="module")
def runner(trained) -> dict:
    """The runner's own logits of best.pt / last.pt on the test split (task.predict, as in
    final_evaluation), its raw uint8 test images and its normalised inputs."""
    ckpt = checkpoint.load(trained / "checkpoints" / "best.pt", "t")
    data = build_data(OmegaConf.create(ckpt["config"]["dataset"]))
    summary = json.loads((trained / "summary.json").read_text())
    out = {"raw": data.test.x, "inputs": torch.cat([b.x for b in data.test.eval_batches(512)])}
    for weights in ("best", "last"):
        model = build_model(OmegaConf.create(ckpt["model_config"]), "student", data)
        model.load_state_dict(checkpoint.load(trained / "checkpoints" / f"{weights}.pt",
                                              "t")["model"])
        logits, targets = predict(model, data.test, 256, torch.device("cpu"), "32")
        # the very logits behind the run's reported number
        assert score(logits, targets)["acc1"] == summary[f"{weights}/test/acc1"]
        out[weights] = logits
    return out


def from_raw(raw: torch.Tensor, info: dict) -> np.ndarray:
    """Raw uint8 images → network input using ONLY the sidecar JSON (what a user would do)."""
    pre = info["preprocessing"]
    c = len(pre["mean"])
    mean = np.asarray(pre["mean"], np.float32).reshape(1, c, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(1, c, 1, 1)
    return ((raw.numpy().astype(np.float32) * np.float32(pre["scale"]) - mean) / std)


def standalone(path: Path):
    """The export as a numpy → numpy function, loaded without distill_cli where possible."""
    if path.suffix == ".pt":
        m = torch.jit.load(str(path))
    elif path.suffix == ".pt2":
        m = torch.export.load(str(path)).module()
    elif path.suffix == ".onnx":
        import onnxruntime

        sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"input": x})[0]
    else:   # weights only: the architecture comes from distill_cli by design
        m = load_safetensors(path)
    return lambda x: m(torch.from_numpy(x)).detach().numpy()


def rel_err(out, ref: torch.Tensor) -> float:
    return float(np.abs(np.asarray(out) - ref.numpy()).max() / max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("ext", [".pt", ".pt2", ".onnx", ".safetensors"])
def test_export_reproduces_the_runner_logits_from_raw_images(exports, runner, variant, ext):
    path = exports[variant][ext]
    info = json.loads(Path(f"{path}.json").read_text())
    x = from_raw(runner["raw"], info)
    np.testing.assert_allclose(x, runner["inputs"].numpy(), rtol=0, atol=1e-6)
    fn = standalone(path)
    ref = runner[VARIANTS[variant][0]]
    assert rel_err(fn(x), ref) <= TOL                       # the whole test split, one batch
    assert rel_err(np.concatenate([fn(x[i:i + 1]) for i in range(5)]), ref[:5]) <= TOL  # batch 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sidecar_json_says_what_a_user_needs(exports, trained, variant):
    summary = json.loads((trained / "summary.json").read_text())
    weights, fold = VARIANTS[variant]
    for ext, path in exports[variant].items():
        info = json.loads(Path(f"{path}.json").read_text())
        assert info["format"] == {".pt": "torchscript", ".pt2": "export", ".onnx": "onnx",
                                  ".safetensors": "safetensors"}[ext]
        assert info["file"] == path.name and path.parent == trained / "export"
        assert info["input_shape"] == [1, 8, 8] and info["num_classes"] == 10
        assert info["class_names"] == [str(i) for i in range(10)]
        pre = info["preprocessing"]
        assert (pre["mean"], pre["std"], pre["scale"]) == ([0.3053], [0.3759], 1 / 255)
        assert info["weights"] == weights and info["checkpoint"] == f"checkpoints/{weights}.pt"
        assert info["test_acc1"] == summary[f"{weights}/test/acc1"]
        assert info["source_run"] == str(trained.resolve()) and info["run_status"] == "finished"
        assert info["torch_version"] == torch.__version__ and info["arch"] == "cnn"
        assert (info["bn_folded"], info["bn_left"]) == ((3, 0) if fold else (0, 3))
        assert info["needs_distill_cli"] == (ext == ".safetensors")
        assert info["verified"]["max_abs_diff_over_logit_scale"] <= 1e-5


def test_folded_exports_hold_no_batchnorm(exports):
    """--fold-bn changes the file, not just the JSON: no BN op left in any graph."""
    import onnx

    def bn_ops(path):
        if path.suffix == ".pt":
            return str(torch.jit.load(str(path)).inlined_graph).count("batch_norm")
        if path.suffix == ".pt2":
            return str(torch.export.load(str(path)).graph).count("batch_norm")
        if path.suffix == ".onnx":
            return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
        from safetensors.torch import load_file
        return sum("running_mean" in k for k in load_file(str(path)))

    for ext in (".pt", ".pt2", ".safetensors"):
        assert bn_ops(exports["best"][ext]) > 0, ext          # the check can fail
        assert bn_ops(exports["last-bnfold"][ext]) == 0, ext
    # torch.onnx's graph optimizer folds BatchNorm into the convs by itself, folded or not
    assert bn_ops(exports["best"][".onnx"]) == bn_ops(exports["last-bnfold"][".onnx"]) == 0


# --------------------------------------------------------------------------- bad input
def test_not_a_run_dir_is_exit_2_and_writes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    proc = export_cli(tmp_path, "--format", "onnx", check_rc=2)
    assert proc.error.startswith("error: ") and "not a distill run dir" in proc.error
    assert "Traceback" not in proc.stderr
    with pytest.raises(UserError, match=r"not\s+a\s+distill\s+run\s+dir"):
        export_run(tmp_path / "missing", "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_unknown_format_and_weights_are_user_errors(trained):
    proc = export_cli(trained, "--format", "tflite", check_rc=2)
    assert "tflite" in proc.error and "torchscript, export, onnx, safetensors" in proc.error
    assert "Traceback" not in proc.stderr
    with pytest.raises(UserError) as err:
        export_run(trained, "onnx", weights="final")
    assert err.value.key == "--weights" and "--weights last" in err.value.fix


def copy_run(trained: Path, dst: Path, files=("summary.json", "checkpoints/last.pt")) -> Path:
    for name in files:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes((trained / name).read_bytes())
    return dst


def test_run_without_best_pt_says_use_last(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path / "r")
    with pytest.raises(UserError) as err:
        export_run(run_dir, "export")
    assert "no checkpoints/best.pt" in err.value.what and "--weights last" in err.value.fix
    assert not (run_dir / "export").exists()
    (path,) = export_run(run_dir, "export", weights="last")   # the fix works
    assert path == run_dir / "export" / "student-last.pt2" and path.is_file()


def test_self_distillation_run_dir_points_at_its_generations(tmp_path):
    run_dir = tmp_path / "sd"
    (run_dir / "gen0").mkdir(parents=True)
    (run_dir / "gen1").mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "generations": []}))
    with pytest.raises(UserError) as err:
        export_run(run_dir, "onnx")
    assert "self-distillation" in err.value.fix and str(run_dir / "gen1") in err.value.fix


def test_corrupt_checkpoint_and_bad_out_are_user_errors(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path / "r")
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot\s+be\s+read"):
        export_run(run_dir, "torchscript")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"is\s+a\s+file") as err:
        export_run(trained, "torchscript", out=blocker)
    assert err.value.key == "--out" and blocker.read_text() == "x"
    assert not (run_dir / "export").exists()


class Branchy(nn.Module):
    """A forward whose path depends on the DATA (the batch's first sample): a trace records one
    path, torch.export and the ONNX exporter refuse it."""

    def __init__(self, num_classes, in_channels, input_size):
        super().__init__()
        n = in_channels * int(np.prod(input_size))
        self.a, self.b = nn.Linear(n, num_classes), nn.Linear(n, num_classes)
        self.register_buffer("threshold", torch.zeros(()))
        self.stages, self.feature_dim, self.classifier = ("a",), n, "a"

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x) if x[0].mean() > self.threshold else self.b(x)


if "test_branchy" not in ARCHS:
    register("test_branchy", input_dims=None)(Branchy)


@pytest.fixture(scope="module")
def branchy_run(tmp_path_factory) -> Path:
    """A run dir holding a Branchy student whose threshold sends the export's verification
    batches (test inputs 0 | 1-2 | 3-63) down different paths."""
    cfg = make_cfg(DIGITS)
    data = build_data(cfg.dataset)
    x = next(iter(data.test.eval_batches(64))).x.flatten(1)
    torch.manual_seed(0)
    model = Branchy(10, 1, (8, 8))
    model.threshold.fill_((x[0].mean() + x[1].mean()) / 2)
    assert (x[0].mean() > model.threshold) != (x[1].mean() > model.threshold)
    run_dir = tmp_path_factory.mktemp("branchy") / "run"
    checkpoint.save(run_dir / "checkpoints" / "best.pt", {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model_config": {"_target_": "distill_cli.models.create", "arch": "test_branchy"},
        "data": {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8]},
        "model": model.state_dict(), "state": {"epoch": 1}})
    return run_dir


@pytest.mark.parametrize("fmt", ["torchscript", "export", "onnx"])
def test_data_dependent_branch_is_refused_naming_a_format_that_works(branchy_run, fmt):
    with pytest.raises(UserError) as err:
        export_run(branchy_run, fmt)
    assert err.value.key == "--format" and "--format safetensors" in err.value.fix
    assert "data-dependent" in err.value.what
    assert not (branchy_run / "export").exists()


def test_the_suggested_format_holds_a_data_dependent_model(branchy_run, runner):
    (path,) = export_run(branchy_run, "safetensors", out=branchy_run / "st")
    model = load_safetensors(path)
    ref = Branchy(10, 1, (8, 8))
    ref.load_state_dict(checkpoint.load(branchy_run / "checkpoints" / "best.pt", "t")["model"])
    x = runner["inputs"][:8]
    with torch.no_grad():
        for i in range(8):   # both paths
            torch.testing.assert_close(model(x[i:i + 1]), ref(x[i:i + 1]), rtol=0, atol=0)


# --------------------------------------------------------------------------- W&B
def test_wandb_logs_the_student_as_a_model_artifact(trained, tmp_path, monkeypatch):
    """A real offline W&B run: its transaction log records the `model` artifact, one version
    per alias, each holding the checkpoint file."""
    import wandb
    from test_config import wandb_records

    from distill_cli.reporting.tracking import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))   # artifact staging
    summary = json.loads((trained / "summary.json").read_text())
    ckpts = {"best": trained / "checkpoints" / "best.pt",
             "latest": trained / "checkpoints" / "last.pt"}
    log = WandbLogger(tmp_path, config={}, name="t")
    log.log_model(ckpts, summary)
    log.finish(0)
    wandb.teardown()   # the offline transaction log is complete only then (see test_config)
    (file,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")
    arts = [r.artifact for r in wandb_records(file) if r.WhichOneof("record_type") == "artifact"]
    assert [a.type for a in arts] == ["model", "model"]
    assert {a.name for a in arts} == {f"student-{log.run_id}"}
    for art, (alias, path) in zip(arts, ckpts.items()):
        assert alias in art.aliases
        meta = json.loads(art.metadata)
        assert meta["weights"] == alias and meta["best/test/acc1"] == summary["best/test/acc1"]
        (entry,) = art.manifest.contents
        assert entry.path == "checkpoint.pt" and entry.size == path.stat().st_size
        assert Path(entry.local_path).read_bytes() == path.read_bytes()
