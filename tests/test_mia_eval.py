"""`eval.mia`: membership inference of the final (best) weights in the summary — on by default
for objectives that measure privacy (Swing), off otherwise unless asked for."""
from __future__ import annotations

import json

import pytest

from distill_cli.errors import UserError
from distill_cli.training.run import run

from conftest import DIGITS, make_cfg

BASE = DIGITS + ["student=mlp"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))


def test_swing_measures_membership_inference_by_default(tmp_path, digits_teacher):
    teacher = ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}"]
    summary = run(make_cfg(BASE + teacher + ["loss=swing"]), tmp_path / "sw", tty=False)
    on_disk = json.loads((tmp_path / "sw" / "summary.json").read_text())
    for prefix in ("", "teacher/"):
        assert 0.0 <= on_disk[f"{prefix}mia/auc"] <= 1.0
        assert 0.0 <= on_disk[f"{prefix}mia/advantage"] <= 1.0
        assert on_disk[f"{prefix}mia/n"] == 360   # min(train, test) of digits: equal sides
    assert summary["mia/auc"] == on_disk["mia/auc"]
    off = run(make_cfg(BASE + teacher + ["loss=swing", "eval.mia=false"]), tmp_path / "off",
              tty=False)
    assert not any(k.startswith(("mia/", "teacher/mia/")) for k in off)


def test_ce_measures_it_only_when_asked(tmp_path):
    plain = run(make_cfg(BASE + ["loss=ce"]), tmp_path / "ce", tty=False)
    assert not any("mia/" in k for k in plain)
    asked = run(make_cfg(BASE + ["loss=ce", "eval.mia=true", "eval.mia_max_samples=100"]),
                tmp_path / "mia", tty=False)
    assert 0.0 <= asked["mia/auc"] <= 1.0 and asked["mia/n"] == 100
    assert "teacher/mia/auc" not in asked


def test_bad_mia_option_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        run(make_cfg(BASE + ["loss=ce", "eval.mia=sometimes"]), tmp_path / "r", tty=False)
    assert info.value.key == "eval.mia" and not (tmp_path / "r").exists()
