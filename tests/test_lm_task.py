"""task=lm end to end: a store-trained GPT teacher, token-level KD, the LM metrics against a
float64 reference, samples, exact resume and refusals."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distill_cli.errors import UserError
from distill_cli.runs import checkpoint
from distill_cli.tasks.lm.task import LMTask
from distill_cli.training.run import RunInterrupted, run

from conftest import make_cfg

TINY = ["recipe=lm_stdlib_tiny", "logger=none", "dataset.block_size=32",
        "dataset.limit_train=96", "dataset.limit_eval=24", "trainer.epochs=2",
        "trainer.batch_size=16", "teacher.train.epochs=1", "teacher.d_model=32",
        "teacher.n_layers=1", "teacher.n_heads=2", "student.d_model=16", "student.n_heads=2",
        "student.n_layers=1", "trainer.log_every_n_steps=2"]


def test_scores_match_a_float64_reference():
    torch.manual_seed(0)
    out, ref = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    y = torch.randint(0, 7, (3, 5))
    y[0, 3:] = -100
    y[2, 0] = -100
    s = LMTask().score(out, y, ref)
    nll = kl = agree = acc = 0.0
    n = 0
    for b in range(3):
        for t in range(5):
            if int(y[b, t]) == -100:
                continue
            n += 1
            o = [float(v) for v in out[b, t]]
            r = [float(v) for v in ref[b, t]]
            zo = math.log(sum(math.exp(v) for v in o))
            zr = math.log(sum(math.exp(v) for v in r))
            nll -= o[int(y[b, t])] - zo
            kl += sum(math.exp(rv - zr) * ((rv - zr) - (ov - zo)) for ov, rv in zip(o, r))
            agree += o.index(max(o)) == r.index(max(r))
            acc += o.index(max(o)) == int(y[b, t])
    assert s["n"] == n == 12
    assert s["nll"] == pytest.approx(nll / n, rel=1e-12)
    assert s["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-12)
    assert s["token_kl"] == pytest.approx(kl / n, rel=1e-10)
    assert s["agreement"] == pytest.approx(100 * agree / n)
    assert s["acc1"] == pytest.approx(100 * acc / n)
    assert LMTask().score(ref, y, ref)["token_kl"] == pytest.approx(0, abs=1e-12)


def test_a_distillation_run_trains_its_teacher_and_reports_the_lm_metrics(tmp_path):
    summary = run(make_cfg([*TINY, "loss=fkl"]), tmp_path / "r", tty=False)
    assert summary["status"] == "finished" and summary["task"] == "lm"
    for key in ("best/test/ppl", "last/test/nll", "best/test/agreement", "best/test/token_kl",
                "teacher/test/ppl"):
        assert math.isfinite(summary[key]), key
    assert summary["best/test/ppl"] < 258   # better than a uniform guess over the bytes
    text = (tmp_path / "r" / "samples_best.txt").read_text()
    assert text.count("--- prompt") == 4 and "greedy" in text
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "val/token_kl" in rows[0] and "best/val/neg_nll" in rows[-1]


def test_resume_after_an_interruption_is_bit_exact(tmp_path):
    run(make_cfg([*TINY, "loss=gkd"]), tmp_path / "full", tty=False)
    with pytest.raises(RunInterrupted):
        run(make_cfg([*TINY, "loss=gkd", "trainer.stop_at_step=5"]), tmp_path / "cut", tty=False)
    run(make_cfg([*TINY, "loss=gkd", "trainer.resume=auto"]), tmp_path / "cut", tty=False)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt", "t")["model"]
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt", "t")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides,key", [
    (["loss=kd"], "loss"),                                  # a classifier loss on an LM
    (["dataset=digits", "loss=lm_ce"], "dataset"),          # images as the LM's data
])
def test_bad_input_is_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(UserError) as info:
        run(make_cfg([*TINY, *overrides]), tmp_path / "r", tty=False)
    assert info.value.key == key and info.value.fix
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_classifier_as_the_lm_student_is_refused(tmp_path):
    with pytest.raises(UserError) as info:
        run(make_cfg(["recipe=lm_stdlib_tiny", "logger=none", "student=cnn", "loss=lm_ce",
                      "dataset.limit_train=32", "dataset.block_size=16"]), tmp_path / "r",
            tty=False)
    # the zoo refuses a 2-D image network for 1-D token blocks, listing the ones that fit
    assert info.value.key in ("student", "arch") and "gpt" in info.value.fix


def test_an_lm_loss_under_the_classification_task_is_refused(tmp_path):
    with pytest.raises(UserError) as info:
        run(make_cfg(["dataset=digits", "logger=none", "student=mlp", "teacher=mlp",
                      "loss=fkl"]), tmp_path / "r", tty=False)
    assert info.value.key == "loss"


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * (40 + i))
    common = ["recipe=lm_stdlib_tiny", "logger=none", "dataset.corpus=path",
              f"dataset.path={docs}", "dataset.block_size=16", "trainer.epochs=1",
              "trainer.batch_size=8", "student.d_model=16", "student.n_heads=2",
              "student.n_layers=1", "loss=lm_ce"]
    run(make_cfg(common), tmp_path / "byte", tty=False)
    with pytest.raises(UserError) as info:
        run(make_cfg([*common, "dataset.tokenizer=bpe", "dataset.vocab_size=300",
                      "loss=fkl", "teacher=gpt_tiny",
                      f"teacher.checkpoint={tmp_path}/byte/checkpoints/best.pt"]),
            tmp_path / "bpe", tty=False)
    assert info.value.key.startswith("teacher")


def test_the_gpu_recipe_composes_and_its_models_build(tmp_path):
    """recipe=lm_stdlib_gpu (not run on CPU) composes to what its comment promises — an
    8,192-token BPE, bf16, a stored top-k for loss=topk — and its teacher and student build at the
    recipe's
    sizes and map a block of its length to next-token logits (on a small user corpus with
    byte tokens, so no BPE is trained here)."""
    from distill_cli.config.build import build_data, build_task

    cfg = make_cfg(["recipe=lm_stdlib_gpu"])
    assert (cfg.dataset.corpus, cfg.dataset.tokenizer, cfg.dataset.vocab_size) == \
        ("stdlib", "bpe", 8192)
    assert cfg.trainer.precision == "bf16" and cfg.teacher.outputs == "live"
    topk = make_cfg(["recipe=lm_stdlib_gpu", "loss=topk"])
    assert topk.teacher.outputs == "auto" and topk.loss.k == 64
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * 60)
    cfg = make_cfg(["recipe=lm_stdlib_gpu", "dataset.corpus=path", f"dataset.path={docs}",
                    "dataset.tokenizer=byte", "dataset.val_fraction=0.34",
                    "dataset.test_fraction=0.34"])
    data = build_data(cfg.dataset)
    task = build_task(cfg.task)
    x = data.train.x[:1]
    assert x.shape == (1, 256)
    sizes = {}
    for key in ("teacher", "student"):
        model = task.build_model(cfg[key], key, data)
        sizes[key] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            assert model(x).shape == (1, 256, data.num_classes), key
    assert sizes["teacher"] > 5 * sizes["student"]
