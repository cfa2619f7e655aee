"""Self-distillation (Borup & Andersen): the objective vs float64 NumPy (α weights the ground
truth), the α* reconstruction, and generations end to end — one run dir per generation, each
distilled from the previous generation's final weights (last.pt, the authors'), auto α, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill_cli.config.build import build_objective
from distill_cli.errors import UserError
from distill_cli.training.launch import launch as run
from distill_cli.training.run import RunInterrupted
from distill_cli.losses.self_distill import SelfDistill
from distill_cli.training.generations import optimal_alpha

from conftest import DIGITS, make_cfg

B, NC = 9, 5
# MSE on probabilities has small gradients: the authors' Adam (scale-free steps, loss.optimizer)
# at 3e-3 keeps 2-epoch runs meaningful
SD = DIGITS + ["student=mlp", "loss=self_distill", "loss.optimizer.lr=3e-3"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))  # teacher outputs of each gen


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_self_distill(s, t, y, alpha):
    p, onehot = np_softmax(s), np.eye(s.shape[1])[y]
    label = np.mean((p - onehot) ** 2)
    teacher = np.mean((p - np_softmax(t)) ** 2)
    return {"loss": alpha * label + (1 - alpha) * teacher, "label_mse": label,
            "teacher_mse": teacher}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_objective_matches_numpy_float64(alpha):
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(B, NC, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    y = torch.randint(0, NC, (B,), generator=g)
    got = SelfDistill(alpha)(s, t, y)
    for k, v in np_self_distill(s.numpy(), t.numpy(), y.numpy(), alpha).items():
        assert float(got[k]) == pytest.approx(v, rel=1e-12, abs=1e-15), k


def test_alpha_weights_the_ground_truth():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(B, NC, generator=g, dtype=torch.float64).requires_grad_()
    t1, t2 = (torch.randn(B, NC, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, NC, (B,), generator=g)
    # alpha = 1: labels only, the teacher does not matter
    assert torch.equal(SelfDistill(1.0)(s, t1, y)["loss"], SelfDistill(1.0)(s, t2, y)["loss"])
    # alpha = 0: teacher only, and a perfect match of the teacher's softmax costs nothing
    assert float(SelfDistill(0.0)(t1, t1, y)["loss"]) == 0.0
    # the teacher gets no gradient
    t = t1.clone().requires_grad_()
    SelfDistill(0.5)(s, t, y)["loss"].backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_optimal_alpha_reconstruction():
    g = torch.Generator().manual_seed(2)
    f0, f1 = torch.rand(20, 4, generator=g), torch.rand(20, 4, generator=g)
    assert optimal_alpha(f0, f1, f1) == pytest.approx(1.0)
    assert optimal_alpha(f0, f1, f0) == pytest.approx(0.0)
    assert optimal_alpha(f0, f1, 0.3 * f1 + 0.7 * f0) == pytest.approx(0.3)
    # against the formula in float64 NumPy, on a y off the line
    y = torch.rand(20, 4, generator=g)
    d, r = (f1 - f0).double().numpy(), (y - f0).double().numpy()
    want = float(np.clip((d * r).sum() / (d * d).sum(), 0, 1))
    assert optimal_alpha(f0, f1, y) == pytest.approx(want, rel=1e-12)
    assert optimal_alpha(f0, f1, f1 + 2 * (f1 - f0)) == 1.0      # clipped
    assert optimal_alpha(f0, f1, f0 - (f1 - f0)) == 0.0
    assert optimal_alpha(f0, f0, f1) == 0.5                      # identical fits


def test_options_are_checked_before_training(tmp_path):
    with pytest.raises(UserError) as info:
        run(make_cfg(DIGITS + ["student=mlp", "loss=kd", "self_distill.generations=1"]),
            tmp_path / "a", tty=False)
    assert info.value.key == "loss"
    with pytest.raises(UserError) as info:
        run(make_cfg(SD + ["self_distill.generations=-1"]), tmp_path / "b", tty=False)
    assert info.value.key == "self_distill.generations"
    with pytest.raises(UserError) as info:
        run(make_cfg(SD + ["self_distill.generations=1", "self_distill.alpha=1.5"]),
            tmp_path / "c", tty=False)
    assert info.value.key == "self_distill.alpha"
    with pytest.raises(UserError) as info:   # auto needs generations
        build_objective(make_cfg(SD + ["self_distill.alpha=auto"]).loss)
    assert info.value.key == "self_distill.alpha"
    assert not any((tmp_path / d).exists() for d in "abc")


def test_two_generations_end_to_end(tmp_path):
    run_dir = tmp_path / "sd"
    summary = run(make_cfg(SD + ["self_distill.generations=2", "self_distill.alpha=0.4"]),
                  run_dir, tty=False)
    assert summary["status"] == "finished"
    gens = summary["generations"]
    assert [g["generation"] for g in gens] == [0, 1, 2]
    for k, g in enumerate(gens):
        gdir = run_dir / f"gen{k}"
        assert g["run_dir"] == str(gdir) and (gdir / "checkpoints" / "best.pt").is_file()
        own = json.loads((gdir / "summary.json").read_text())
        assert own["status"] == "finished" and own["best/test/acc1"] == g["best/test/acc1"]
        cfg = torch.load(gdir / "checkpoints" / "last.pt", weights_only=True)["config"]
        assert cfg["seed"] == k and cfg["student"]["arch"] == "mlp"
        # the authors' Adam in every generation, whatever the optimizer group says
        assert cfg["optimizer"]["_target_"] == "torch.optim.Adam"
        if k == 0:   # labels only, no teacher: the same MSE at alpha = 1 (the authors)
            assert own["loss"] == "SelfDistill" and g["alpha"] is None
            assert cfg["loss"]["alpha"] == 1.0
            assert g["teacher/checkpoint"] is None and cfg["teacher"]["arch"] is None
        else:        # distilled from generation k-1's final weights, same architecture
            prev = str(run_dir / f"gen{k - 1}" / "checkpoints" / "last.pt")
            assert g["teacher/checkpoint"] == prev == own["teacher/checkpoint"]
            assert cfg["teacher"]["checkpoint"] == prev and cfg["teacher"]["arch"] == "mlp"
            assert own["loss"] == "SelfDistill" and cfg["loss"]["alpha"] == g["alpha"] == 0.4
    assert gens[0]["best/test/acc1"] > 80
    # the final generation's metrics are the run's own
    assert summary["best/test/acc1"] == gens[-1]["best/test/acc1"]
    assert summary["last/test/acc1"] == gens[-1]["last/test/acc1"]
    assert json.loads((run_dir / "summary.json").read_text())["generations"] == gens


def test_auto_alpha_records_a_per_generation_alpha(tmp_path):
    run_dir = tmp_path / "auto"
    summary = run(make_cfg(SD + ["self_distill.generations=1", "self_distill.alpha=auto"]),
                  run_dir, tty=False)
    alpha = summary["generations"][1]["alpha"]
    assert isinstance(alpha, float) and 0.0 <= alpha <= 1.0
    for fit in ("gen1_alpha1", "gen1_alpha0"):   # the two fits that chose it
        assert (run_dir / fit / "checkpoints" / "best.pt").is_file()
    cfg = torch.load(run_dir / "gen1" / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert cfg["loss"]["alpha"] == alpha


def test_interrupted_generations_resume_to_the_same_result(tmp_path):
    base = SD + ["self_distill.generations=1"]
    full = tmp_path / "full"
    run(make_cfg(base), full, tty=False)
    parted = tmp_path / "parted"
    with pytest.raises(RunInterrupted) as info:
        run(make_cfg(base + ["trainer.stop_at_step=5"]), parted, tty=False)
    assert info.value.run_dir == parted
    assert json.loads((parted / "summary.json").read_text())["status"] == "interrupted"
    summary = run(make_cfg(base + ["trainer.resume=auto"]), parted, tty=False)
    assert summary["status"] == "finished"
    for gen in ("gen0", "gen1"):
        a, b = (torch.load(d / gen / "checkpoints" / "last.pt", weights_only=True)["model"]
                for d in (full, parted))
        assert all(torch.equal(a[k], b[k]) for k in a), gen
    with pytest.raises(UserError):   # finished: nothing to resume, nothing overwritten
        run(make_cfg(base + ["trainer.resume=auto"]), parted, tty=False)
