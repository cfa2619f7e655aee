"""`task=classification` is the runner's original behaviour, bit for bit.

Fixed runs (a teacher trained by the store, then a KD student served stored outputs, and an
online BD-KD pair) are pinned to the exact final weights and summary metrics they produced
before the task seam and the topology objects existed. Any change to what a classification run
computes — batch order, augmentation, the teacher store's recipe, the step's order of
operations — changes a hash here. If a change is MEANT to alter the numbers, re-pin with the
values the failure prints and say why in the commit.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import DIGITS, make_cfg
from distill_cli.training.run import run

# one home for the pin's inputs: teacher trained by the store (teacher.train.*), KD stored
FIXED_KD = DIGITS + ["student=mlp", "teacher=cnn_small", "teacher.train.epochs=2",
                     "loss=kd", "seed=3", "trainer.epochs=2"]
FIXED_ONLINE = DIGITS + ["student=mlp", "teacher=cnn_small", "loss=bdkd", "seed=1",
                         "trainer.epochs=1"]
FIXED_FEATURES = DIGITS + ["student=cnn_small", "teacher=cnn_small", "teacher.train.epochs=1",
                           "loss=fitnet", "seed=2", "trainer.epochs=1"]
FIXED_POOL = DIGITS + ["student=mlp", "loss=multi_teacher", "teacher.train.epochs=1",
                       "trainer.epochs=1", "teachers=[{arch: mlp}, {arch: mlp, seed: 1}]"]
CASES = {"kd": FIXED_KD, "bdkd": FIXED_ONLINE, "fitnet": FIXED_FEATURES,
         "multi_teacher": FIXED_POOL}

# measured on the code before the task seam (commit d42fccb), one torch thread (conftest), on
# the CPU of this project's machines until 2026-11-30 (an AVX-512 AMD EPYC gives the same bits,
# 2026-12-02). The same code gives other bits on another CPU: its kernels (ATen's, oneDNN's,
# MKL's) dispatch on the instruction set and vendor. Each later set was measured on a new CPU
# with code whose CI had passed on the earlier sets. A run must give one of the sets exactly: a
# change in what a run computes hits none of them.
PINNED_BY_CPU = {
    "first machine / AVX-512 AMD EPYC": {
        "kd": {"weights": "cc5618d3f7c9ff83", "metrics": "f8f158e416942929"},
        "bdkd": {"weights": "2f1c5ff4729e8689", "metrics": "e07fe8b9bee3724e"},
        # re-pinned for RepDistiller's ConvReg regressor (a 1x1 conv on equal sizes, issue
        # #18); `loss.regressor=ours` still gives a00062778107d758 / 977e1628dcd955bf
        "fitnet": {"weights": "f908588bf4f44efa", "metrics": "327662e31429d83f"},
        "multi_teacher": {"weights": "87ac78204f0604a7", "metrics": "b42e3e6212ba03b1"}},
    # 2026-12-01, code of c4feee6
    "AVX2 AMD EPYC": {
        "kd": {"weights": "f081b25c88fea337", "metrics": "54fd4045c5c86957"},
        "bdkd": {"weights": "2953af3207220197", "metrics": "ff6cdd025352b412"},
        "fitnet": {"weights": "ea1837067e190304", "metrics": "e34512262d0c8010"},
        "multi_teacher": {"weights": "3b2fe3948032c7c9", "metrics": "d3b79cbb3c512690"}},
    # 2026-12-02, code of d467b36 (CI passed on the AVX-512 AMD EPYC the same day)
    "AVX-512 Intel Xeon": {
        "kd": {"weights": "78d0da5895f7ae41", "metrics": "4df825637793fe2f"},
        "bdkd": {"weights": "387d86cf9b853c2f", "metrics": "089213b35f2f5a69"},
        "fitnet": {"weights": "5978828f21675229", "metrics": "4452fc69181dc93b"},
        "multi_teacher": {"weights": "8eb6d541531a375b", "metrics": "5ac423b5f7e749b1"}},
}
# what a run computed, not where or when: every test metric, the teacher's identity and source
PINNED_PREFIXES = ("best/", "last/", "teacher/test/", "teachers/", "teacher/key",
                   "teacher/outputs", "teacher/source", "epochs", "step")
UNPINNED = ("teachers/entries", "teacher/outputs_dir")


def pinned_metrics(summary: dict) -> dict:
    return {k: v for k, v in summary.items()
            if k.startswith(PINNED_PREFIXES) and not k.startswith(UNPINNED)}


def weights_hash(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(CASES))
def test_classification_run_is_pinned_bit_for_bit(tmp_path, monkeypatch, name):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    summary = run(make_cfg(CASES[name]), tmp_path / "run", tty=False)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    metrics = pinned_metrics(summary)
    got = {"weights": weights_hash(last["model"]), "metrics": hashlib.sha256(
        json.dumps(metrics, sort_keys=True).encode()).hexdigest()[:16]}
    assert got in [pins[name] for pins in PINNED_BY_CPU.values()], (
        f"re-pin {name} with {got!r} (only if the change is meant, or add this CPU's set if the "
        f"code's CI passed on the pinned CPUs: {summary['machine']}); metrics: {metrics}")
