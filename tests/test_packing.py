"""packing.py and the static-shape head: the packed trunk and the static head give the padded path's /
the per-modality head's loss and gradients, on batches whose masks span many lengths."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastpath  # noqa: E402
import masking  # noqa: E402
import modalities as M  # noqa: E402
from adapters import fold_flat_keys  # noqa: E402  (the adapter switches, given flat)
from model import Nano4M, Nano4MConfig  # noqa: E402

TINY = dict(n_enc_layer=2, n_dec_layer=2, n_embd=32, n_head=2)


def tiny(**kw):
    torch.manual_seed(0)
    return Nano4M(Nano4MConfig(**fold_flat_keys({**TINY, **kw}))).double()


def recipe_batch(B=8, seed=0, input_budget=(1, 300), target_budget=(1, 300)):
    """A masking.py batch: per sample, input and target counts anywhere from 1 to 300 (and the modalities'
    shares from a Dirichlet), so the rows have many different lengths and modality mixes."""
    g = torch.Generator().manual_seed(seed)
    cfg = masking.MaskingConfig(input_budget=input_budget, target_budget=target_budget)
    return masking.build_batch(masking.random_tokens(B, generator=g), cfg, g)


def scattered_batch(B=4, Ni=40, No=48, seed=1):
    """Positions anywhere (targets not grouped by modality), valid slots not all at the front."""
    g = torch.Generator().manual_seed(seed)
    vocabs = torch.tensor([m.vocab for m in M.MODALITIES])
    enc_pos = torch.randint(0, M.TOTAL_POSITIONS, (B, Ni), generator=g)
    dec_pos = torch.randint(0, M.TOTAL_POSITIONS, (B, No), generator=g)
    ids = lambda pos: (torch.rand(pos.shape, generator=g) * vocabs[M.position_modality(pos)]).long()
    enc_valid = torch.rand(B, Ni, generator=g) < torch.linspace(0.2, 0.9, B)[:, None]
    enc_valid[:, 0] = True
    dec_valid = torch.rand(B, No, generator=g) < torch.linspace(0.9, 0.1, B)[:, None]
    dec_ids = torch.where(M.position_modality(dec_pos) == M.modality_index("caption"), M.IGNORE_ID, ids(dec_pos))
    dec_ids[:, ::2] = ids(dec_pos)[:, ::2]      # some caption targets scored, some only queried
    return dict(enc_ids=ids(enc_pos), enc_pos=enc_pos, enc_valid=enc_valid, dec_pos=dec_pos,
                dec_valid=dec_valid, dec_ids=dec_ids)


def loss_and_grads(model, b):
    model.zero_grad(set_to_none=True)
    loss, per = model(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"], b["dec_ids"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: (s.detach(), c) for k, (s, c) in per.items()}, grads


def assert_same(a, b, float32=False):
    """Same loss, per-modality sums and counts, and gradients. The model runs in float64 (so only a real
    difference shows up), the heads in float32 always (float32=True: float32 tolerances)."""
    (la, pa, ga), (lb, pb, gb) = a, b
    rtol, atol = (1e-5, 1e-6) if float32 else (1e-9, 1e-12)
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    for name in pa:
        torch.testing.assert_close(pa[name][0], pb[name][0], rtol=rtol, atol=atol * 1e3)
        assert float(pa[name][1]) == float(pb[name][1])
    assert ga.keys() == gb.keys()
    for name in ga:
        scale = float(gb[name].abs().max())
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol * 10, atol=max(atol, rtol * scale), msg=name)


@pytest.mark.parametrize("kw", [dict(), dict(dec_same_modality=False), dict(separate_vocab=True, grid_conv=True)])
def test_packed_step_equals_padded_step_on_a_batch_of_many_lengths(kw):
    model = tiny(**kw)
    b = recipe_batch()
    n_in, n_out = b["enc_valid"].sum(1), b["dec_valid"].sum(1)
    assert len(set(n_in.tolist())) >= 6 and len(set(n_out.tolist())) >= 6      # many lengths
    assert int(n_in.min()) < 100 < int(n_in.max()) and int(n_out.min()) < 100 < int(n_out.max())
    padded = loss_and_grads(model, b)
    model.packed = True
    packed = loss_and_grads(model, b)
    assert torch.isfinite(packed[0])
    assert_same(packed, padded)
    assert len(padded[2]) == len([p for p in model.parameters()])      # every weight got a gradient


def test_packed_equals_padded_when_targets_are_not_grouped_by_modality():
    model = tiny()
    b = scattered_batch()
    b["dec_valid"][1] = False         # a sample with inputs but no targets at all
    padded = loss_and_grads(model, b)
    model.packed = True
    assert_same(loss_and_grads(model, b), padded)
    # and the decoder output itself, at every real target row (padding rows are zeros on the packed path)
    with torch.no_grad():
        args = (b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
        h_packed = model.decode_hidden(*args)
        model.packed = False
        h_padded = model.decode_hidden(*args)
    v = b["dec_valid"]
    torch.testing.assert_close(h_packed[v], h_padded[v], rtol=1e-9, atol=1e-12)
    assert (h_packed[~v] == 0).all()


def test_packed_keeps_each_sample_and_modality_to_itself():
    """Changing sample 1's inputs moves no output of sample 0; changing an audio target's position moves no
    rgb target of the same sample (the decoder's same-modality rule)."""
    model = tiny()
    model.packed = True
    b = recipe_batch(B=3, seed=4)
    args = lambda b: (b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
    with torch.no_grad():
        h0 = model.decode_hidden(*args(b))
        b2 = dict(b, enc_ids=b["enc_ids"].clone())
        b2["enc_ids"][1] = (b2["enc_ids"][1] + 1) % 2048
        h1 = model.decode_hidden(*args(b2))
    torch.testing.assert_close(h1[0], h0[0], rtol=0, atol=0)
    torch.testing.assert_close(h1[2], h0[2], rtol=0, atol=0)
    assert not torch.allclose(h1[1][b["dec_valid"][1]], h0[1][b["dec_valid"][1]])
    mod = M.position_modality(b["dec_pos"][0])
    audio = (mod == M.modality_index("tok_audio")) & b["dec_valid"][0]
    other = ~audio & b["dec_valid"][0]
    assert audio.sum() >= 2 and other.sum() >= 1
    b3 = dict(b, dec_pos=b["dec_pos"].clone())
    i = int(audio.nonzero()[0])
    b3["dec_pos"][0, i] = b["dec_pos"][0, audio].max() + 2 if b["dec_pos"][0, audio].max() + 2 < M.POS_OFFSETS[4] \
        else b["dec_pos"][0, audio].min() - 2
    with torch.no_grad():
        h3 = model.decode_hidden(*args(b3))
    torch.testing.assert_close(h3[0][other], h0[0][other], rtol=0, atol=0)
    assert not torch.allclose(h3[0][audio], h0[0][audio])


@pytest.mark.parametrize("separate_vocab", [False, True])
def test_static_head_equals_the_per_modality_head(separate_vocab):
    model = tiny(separate_vocab=separate_vocab)
    for b in (recipe_batch(B=6, seed=2), scattered_batch()):
        per_modality = loss_and_grads(model, b)
        model.fast = model.static_head = True
        static = loss_and_grads(model, b)
        model.fast = model.static_head = False
        assert_same(static, per_modality, float32=True)


def test_static_head_with_no_targets_is_a_zero_that_still_backpropagates():
    model = tiny()
    model.fast = model.static_head = True
    b = scattered_batch()
    b["dec_valid"] = torch.zeros_like(b["dec_valid"])
    loss, _, grads = loss_and_grads(model, b)
    assert float(loss) == 0.0
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_static_head_traces_as_one_graph():
    """No host sync and no data-dependent shape in the static head: torch.compile takes it whole
    (fullgraph=True fails at the first graph break; the eager backend only traces, so this is quick)."""
    model = tiny()
    b = recipe_batch(B=3, seed=3)
    h = model.decode_hidden(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
    compiled = torch.compile(fastpath.static_shape_loss, backend="eager", fullgraph=True)
    loss, _ = compiled(model, h, b["dec_pos"], b["dec_ids"], b["dec_valid"])
    ref, _ = fastpath.per_modality_loss(model, h, b["dec_pos"], b["dec_ids"], b["dec_valid"])
    torch.testing.assert_close(loss, ref)
