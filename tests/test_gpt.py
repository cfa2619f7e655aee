"""The `gpt` zoo model (models/gpt.py): causality, KV-cached decoding against full recomputation,
seeded sampling, tied embeddings, parameter count, RoPE and attention against float64 references,
GPT-2 init, the zoo contract, the YAMLs and the refused inputs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_cli.config import build
from distill_cli.config.paths import CONF_DIR
from distill_cli.errors import UserError
from distill_cli.models import ClassifierInput, FeatureTaps, create
from distill_cli.models.gpt import GPT, apply_rope, rope_tables

from conftest import make_cfg

V, T = 37, 16
POSITIONS = ["rope", "learned"]


def tiny(positions="rope", *, seed=0, **opts) -> GPT:
    torch.manual_seed(seed)
    opts = {"d_model": 32, "n_layers": 2, "n_heads": 4, **opts}
    return create("gpt", V, 1, (T,), positions=positions, **opts).eval()


def ids(b=3, t=T, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- causality and the cache

@pytest.mark.parametrize("positions", POSITIONS)
def test_changing_token_t_never_changes_earlier_logits(positions):
    model = tiny(positions)
    x = ids()
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, T - 1):
            y = x.clone()
            y[:, t] = (y[:, t] + 1) % V
            out = model(y)
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert not torch.allclose(out[:, t], base[:, t])  # the change is seen at t itself


@pytest.mark.parametrize("positions", POSITIONS)
def test_cached_forward_equals_full_forward(positions):
    """Prefill 4, a chunk of 3 (the explicit-mask path), then one token at a time."""
    model = tiny(positions).double()
    x = ids()
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        parts = [model(x[:, :4], cache), model(x[:, 4:7], cache)]
        parts += [model(x[:, t:t + 1], cache) for t in range(7, T)]
    assert cache.length == T
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-10)
    with torch.no_grad():  # float32 as the runner uses it: the brief's 1e-5
        model.float()
        full = model(x)
        cache = model.new_cache(T)
        steps = [model(x[:, :1], cache)] + [model(x[:, t:t + 1], cache) for t in range(1, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


def naive_generate(model, prompt, n, *, temperature=0.0, top_k=None, generator=None):
    """Recompute the full sequence every step (no cache): tokens and their model log-probs."""
    seq, lps = prompt, []
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq)[:, -1]
            tok = (logits.argmax(-1) if temperature == 0   # greedy written out here
                   else GPT._pick(logits, temperature, top_k, generator))
            lps.append(F.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0])
            seq = torch.cat([seq, tok[:, None]], 1)
    return seq, torch.stack(lps, 1)


@pytest.mark.parametrize("positions", POSITIONS)
def test_generate_equals_recomputing_the_full_sequence(positions):
    model = tiny(positions)
    prompt = ids(4, 3)
    out, lp = model.generate(prompt, T - 3, temperature=0, return_logprobs=True)
    ref, ref_lp = naive_generate(model, prompt, T - 3)
    assert out.shape == (4, T) and torch.equal(out[:, :3], prompt)
    assert torch.equal(out, ref)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    # sampled, top-k: the same generator seed draws the same tokens both ways
    out = model.generate(prompt, 10, top_k=5, temperature=0.8,
                         generator=torch.Generator().manual_seed(3))
    ref, _ = naive_generate(model, prompt, 10, top_k=5, temperature=0.8,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, ref)


def test_same_seed_same_samples_other_seed_other_samples():
    model = tiny()
    prompt = ids(4, 2)

    def sample(seed, **kw):
        return model.generate(prompt, 12, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert torch.equal(sample(7, top_k=1), model.generate(prompt, 12, temperature=0))


def test_top_k_samples_only_among_the_k_largest():
    model = tiny()
    out = model.generate(ids(8, 2), 10, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(out[:, :-1])[:, 1:]  # the logits each new token was drawn from
    top3 = logits.topk(3, -1).indices
    assert (top3 == out[:, 2:, None]).any(-1).all()


def test_eos_fills_the_row_and_stops_when_every_row_is_done():
    model = tiny()

    def gen(prompt, **kw):  # sampled: the generator is drawn from alike with or without eos
        return model.generate(prompt, 12, generator=torch.Generator().manual_seed(1), **kw)

    for prompt in (ids(2, 2, seed=5), ids(1, 2, seed=5)):
        free = gen(prompt)
        eos = int(free[0, 4])  # row 0 emits it at new-token step 2 (maybe earlier too)
        first = int((free[0, 2:] == eos).nonzero()[0])
        assert (free[0, 3 + first:] != eos).any()  # without eos_id the row goes on
        out, lp = gen(prompt, eos_id=eos, return_logprobs=True)
        assert torch.equal(out[0, :3 + first], free[0, :3 + first])
        assert (out[0, 3 + first:] == eos).all() and (lp[0, first + 1:] == 0).all()
        assert (lp[0, :first + 1] < 0).all()
        if len(prompt) == 1:  # every row done: decoding stopped there
            assert out.shape == (1, 3 + first) and lp.shape == (1, first + 1)


def test_generate_runs_without_dropout_and_restores_the_mode():
    model = tiny(dropout=0.5).train()
    prompt = ids(2, 3)
    a = model.generate(prompt, 8, temperature=0)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(a, model.generate(prompt, 8, temperature=0))
    assert torch.equal(a, tiny(dropout=0.5).generate(prompt, 8, temperature=0))


# ---------------------------------------------------------------- weights

def test_tied_embeddings_are_one_parameter():
    model = tiny().train()
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names  # counted once
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = ids()
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    before = model.wte.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.wte.weight, before)
    assert model.lm_head.weight is model.wte.weight
    # a checkpoint round trip keeps them shared and reproduces the logits
    fresh = tiny(seed=5)
    fresh.load_state_dict(model.state_dict())
    assert fresh.lm_head.weight is fresh.wte.weight
    with torch.no_grad():
        fresh.wte.weight.add_(1.0)
        assert torch.equal(fresh.lm_head.weight, model.wte.weight + 1.0)
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_by_hand():
    """V=11, T=7, d=8, 2 layers, 2 heads, d_ff=4d=32."""
    v, t, d, ff = 11, 7, 8, 32

    def build(**opts):
        return create("gpt", v, 1, (t,), d_model=d, n_layers=2, n_heads=2, **opts)

    # no bias, tied, rope: wte v*d; per layer ln_1 d, qkv d*3d, proj d*d, ln_2 d, c_fc d*ff,
    # c_proj ff*d; ln_f d
    layer = d + 3 * d * d + d * d + d + d * ff + ff * d
    assert layer == 784
    assert count(build()) == v * d + 2 * layer + d == 1664
    # bias, untied, learned positions: + wpe t*d, + every Linear/LayerNorm bias, + lm_head v*d
    layer_b = layer + d + 3 * d + d + d + ff + d
    assert count(build(bias=True, tie_embeddings=False, positions="learned")) \
        == v * d + t * d + 2 * layer_b + 2 * d + v * d == 1992
    assert count(build(d_ff=10)) == v * d + 2 * (2 * d + 4 * d * d + 2 * d * 10) + d


def test_gpt2_init():
    torch.manual_seed(0)
    model = create("gpt", 500, 1, (64,), d_model=256, n_layers=6, n_heads=8, bias=True,
                   positions="learned")
    resid = 0.02 / math.sqrt(12)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.c_proj.weight")):
            assert p.std().item() == pytest.approx(resid, rel=0.03), name
        elif name.startswith("blocks") and ".ln_" in name or name.startswith("ln_f"):
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight")
                               else torch.zeros_like(p)), name
        elif name.endswith("bias"):
            assert not p.any(), name
        else:  # wte (= lm_head), wpe, qkv, c_fc
            assert p.std().item() == pytest.approx(0.02, rel=0.03), name
            assert abs(p.mean().item()) < 1e-3, name


# ---------------------------------------------------------------- RoPE and attention, float64

def test_rope_matches_the_formula_in_float64():
    hd, base = 8, 10000.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, hd, dtype=torch.float64, generator=g)
    pos = torch.tensor([0, 1, 2, 9, 15])
    out = apply_rope(x, *rope_tables(pos, hd, torch.float64))
    ref = torch.empty_like(x)
    h = hd // 2
    for ti, p in enumerate(pos.tolist()):
        for i in range(h):
            theta = p * base ** (-2 * i / hd)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[..., ti, i], x[..., ti, i + h]
            ref[..., ti, i] = a * c - b * s
            ref[..., ti, i + h] = a * s + b * c
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # a rotation: norms kept; q.k depends only on the offset between the two positions
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=0, atol=1e-12)
    q, k = x[0, 0, 0], x[0, 0, 1]

    def dot(m, n):
        qm = apply_rope(q, *rope_tables(torch.tensor([m]), hd, torch.float64))
        kn = apply_rope(k, *rope_tables(torch.tensor([n]), hd, torch.float64))
        return float((qm * kn).sum())

    assert dot(7, 3) == pytest.approx(dot(13, 9), abs=1e-12)
    assert dot(7, 3) != pytest.approx(dot(7, 4), abs=1e-6)


def explicit_attention(attn, x, positions, rope: bool):
    """Masked-softmax attention written out: softmax(q k^T / sqrt(hd) + causal -inf) v."""
    b, t, d = x.shape
    h = attn.n_heads
    q, k, v = attn.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    if rope:
        tables = rope_tables(positions, d // h, torch.float64)
        q, k = apply_rope(q, *tables), apply_rope(k, *tables)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    out = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("positions", POSITIONS)
def test_sdpa_equals_explicit_masked_softmax_in_float64(positions):
    model = tiny(positions, bias=True).double()
    attn = model.blocks[1].attn
    x = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9)
    rope = rope_tables(pos, 8, torch.float64) if positions == "rope" else None
    with torch.no_grad():
        ref = explicit_attention(attn, x, pos, positions == "rope")
        torch.testing.assert_close(attn(x, rope), ref, rtol=0, atol=1e-12)
        cache = model.new_cache().layers[1]  # prefill 5, then 4 through the explicit mask
        head = attn(x[:, :5], None if rope is None else tuple(r[:5] for r in rope), cache)
        tail = attn(x[:, 5:], None if rope is None else tuple(r[5:] for r in rope), cache)
    torch.testing.assert_close(torch.cat([head, tail], 1), ref, rtol=0, atol=1e-12)


def test_bf16_autocast_forward_is_close_to_float32():
    model = tiny()
    x = ids()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


# ---------------------------------------------------------------- the zoo contract and configs

def test_zoo_contract_stages_and_classifier_input():
    model = tiny(n_layers=3)
    assert model.stages == ("blocks.0", "blocks.1", "blocks.2")
    assert model.feature_dim == 32 and model.classifier == "lm_head"
    x = ids()
    with torch.no_grad(), FeatureTaps(model, model.stages) as taps, \
            ClassifierInput(model) as pen:
        logits = model(x)
        assert logits.shape == (3, T, V) and logits.dtype == torch.float32
        assert all(taps[s].shape == (3, T, 32) for s in model.stages)
        torch.testing.assert_close(model.lm_head(pen.value), logits)
        torch.testing.assert_close(model.lm_head(model.ln_f(taps["blocks.2"])), logits)


@pytest.mark.parametrize("name,d,layers,heads", [("gpt_tiny", 64, 2, 2),
                                                 ("gpt_small", 256, 6, 8)])
@pytest.mark.parametrize("group", ["student", "teacher"])
def test_registry_builds_it_from_the_yamls(name, d, layers, heads, group):
    from hydra.utils import instantiate

    node = build.model_node(make_cfg([f"{group}={name}"])[group])
    model = build.instantiate(node, group, num_classes=V, in_channels=1, input_size=(T,))
    assert isinstance(model, GPT) and model.positions == "rope"
    assert (model.feature_dim, len(model.blocks), model.blocks[0].attn.n_heads) \
        == (d, layers, heads)
    assert model.blocks[0].mlp.c_fc.out_features == 4 * d
    assert model.lm_head.weight is model.wte.weight
    assert model(ids(2)).shape == (2, T, V)
    plain = instantiate(OmegaConf.load(Path(CONF_DIR) / "student" / f"{name}.yaml"),
                        num_classes=V, in_channels=1, input_size=[T])
    assert count(plain) == count(model)


# ---------------------------------------------------------------- refused inputs

@pytest.mark.parametrize("opts,key", [
    ({"input_size": (8, 8)}, "arch"),
    ({"n_heads": 3}, "n_heads"),
    ({"d_model": 12, "n_heads": 4}, "n_heads"),          # head width 3: RoPE needs pairs
    ({"positions": "alibi"}, "positions"),
    ({"n_layers": 0}, "n_layers"),
    ({"dropout": 1.0}, "dropout"),
    ({"width": 3}, "arch"),
])
def test_bad_options_are_user_errors(opts, key):
    opts = {"input_size": (T,), **opts}
    with pytest.raises(UserError) as err:
        create("gpt", V, 1, opts.pop("input_size"), **opts)
    assert err.value.key == key


def test_odd_head_width_is_fine_with_learned_positions():
    model = create("gpt", V, 1, (T,), d_model=12, n_heads=4, positions="learned")
    assert model(ids()).shape == (3, T, V)


@pytest.mark.parametrize("call,match", [
    (lambda m: m(ids(1, T + 1)), "longer than the model's context length 16"),
    (lambda m: m(ids().float()), "dtype int64"),
    (lambda m: m(ids()[0]), r"\[B, T\]"),
    (lambda m: m.generate(ids(1, 10), 7), "10 tokens \\+ 7 new ones is longer"),
    (lambda m: m.generate(ids(1, 0), 3), "T0 >= 1"),
    (lambda m: m.generate(ids(1, 3) + V, 3), "prompt ids must lie in"),
    (lambda m: m.generate(ids(1, 3), 3, temperature=-1.0), "temperature"),
    (lambda m: m.generate(ids(1, 3), 3, top_k=0), "top_k"),
    (lambda m: m.generate(ids(1, 3), -1), "max_new_tokens"),
    (lambda m: m.generate(ids(1, 3), 3, eos_id=V), "eos_id"),
    (lambda m: m(ids(1, 4), m.new_cache(3)), "longer than|cache holds"),
])
def test_refused_inputs_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny())


def test_generate_the_whole_context_and_zero_new_tokens():
    model = tiny()
    prompt = ids(2, 4)
    out, lp = model.generate(prompt, T - 4, generator=torch.Generator().manual_seed(0),
                             return_logprobs=True)
    assert out.shape == (2, T) and lp.shape == (2, T - 4) and (lp <= 0).all()
    assert model(out).shape == (2, T, V)  # the result fits a scoring forward
    same, none = model.generate(prompt, 0, return_logprobs=True)
    assert torch.equal(same, prompt) and none.shape == (2, 0)
