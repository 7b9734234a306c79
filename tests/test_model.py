"""model.py: size, embeddings, masks, the per-modality float32 loss, optimizer groups, checkpoints."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import modalities as M  # noqa: E402
import fastpath  # noqa: E402
import generation  # noqa: E402
from adapters import fold_flat_keys  # noqa: E402  (the adapter switches, given flat)
from model import Nano4M, Nano4MConfig, load_checkpoint  # noqa: E402

TINY = dict(n_enc_layer=1, n_dec_layer=2, n_embd=32, n_head=2)
VOCABS = torch.tensor([m.vocab for m in M.MODALITIES])


def random_batch(B=3, Ni=20, No=24, seed=0):
    """Random valid-looking batch: positions anywhere, ids inside each position's modality range, the tail
    of every row padding (sample b keeps Ni - 3b inputs and No - 4b targets)."""
    g = torch.Generator().manual_seed(seed)
    enc_pos = torch.randint(0, M.TOTAL_POSITIONS, (B, Ni), generator=g)
    dec_pos = torch.randint(0, M.TOTAL_POSITIONS, (B, No), generator=g)
    ids = lambda pos: (torch.rand(pos.shape, generator=g) * VOCABS[M.position_modality(pos)]).long()
    enc_valid = torch.arange(Ni)[None] < (Ni - 3 * torch.arange(B))[:, None]
    dec_valid = torch.arange(No)[None] < (No - 4 * torch.arange(B))[:, None]
    return dict(enc_ids=ids(enc_pos), enc_pos=enc_pos, enc_valid=enc_valid, dec_pos=dec_pos,
                dec_valid=dec_valid, dec_ids=ids(dec_pos))


def run(model, b):
    return model(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"], b["dec_ids"])


def tiny(**kw):
    torch.manual_seed(0)
    return Nano4M(Nano4MConfig(**fold_flat_keys({**TINY, **kw})))


@pytest.fixture(scope="module")
def default_model():
    return Nano4M(Nano4MConfig())


def test_default_model_is_about_96M_params(default_model):
    model = default_model
    n = model.get_num_params()
    assert 94e6 < n < 98e6, n
    assert model.config.n_embd // model.config.n_head == 64
    assert len(model.encoder) == 6 and len(model.decoder) == 6
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()   # untied


def test_position_table_layout():
    model = tiny()
    table = model.position_table()
    assert table.shape == (M.TOTAL_POSITIONS, 32)
    for m_idx, m in enumerate(M.MODALITIES):
        off = M.POS_OFFSETS[m_idx]
        for i in (0, 1, 15, m.length - 1):
            if m.layout == "grid":
                want = model.pos_row[i // M.GRID] + model.pos_col[i % M.GRID]
            elif m.layout == "audio":
                want = model.pos_frame[i // 2] + model.pos_codebook[i % 2]
            else:
                want = model.pos_seq[i]
            torch.testing.assert_close(table[off + i], want)
    # each global position's modality
    assert (model.pos_modality[torch.tensor(M.POS_OFFSETS)] == torch.arange(5)).all()


@pytest.mark.parametrize("fast", [False, True])   # model.py's plain loss and fastpath.py's: the same numbers
def test_loss_is_mean_over_modalities_of_per_modality_mean_ce(fast):
    model = tiny()
    model.fast = fast
    b = random_batch()
    loss, per = run(model, b)
    h = model.decode_hidden(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
    full = h @ model.lm_head.weight.t()                      # reference: all 50k logits, then slice
    mod = M.position_modality(b["dec_pos"])
    means = []
    for m_idx, m in enumerate(M.MODALITIES):
        sel = b["dec_valid"] & (mod == m_idx)
        s, c = per[m.name]
        assert int(c) == int(sel.sum())
        if sel.sum() == 0:
            continue
        ce = F.cross_entropy(full[sel][:, :m.vocab], b["dec_ids"][sel], reduction="sum")
        torch.testing.assert_close(s, ce.detach(), rtol=1e-5, atol=1e-4)
        means.append(ce / sel.sum())
    torch.testing.assert_close(loss, torch.stack(means).mean(), rtol=1e-5, atol=1e-5)
    # initial CE near log(vocab) per modality
    for m in M.MODALITIES:
        s, c = per[m.name]
        if c > 0:
            assert abs(float(s / c) - math.log(m.vocab)) < 1.5


@pytest.mark.parametrize("fast", [False, True])
def test_separate_vocab_gives_each_modality_its_own_rows(fast):
    """separate_vocab=True: modality m's ids read and predict rows row_offset[m] + id; the loss is still each
    modality's CE over its own vocabulary, its gradient reaches only those rows, and the same id of two
    modalities is two different embeddings."""
    shared, own = tiny(), tiny(separate_vocab=True)
    own.fast = fast
    rows = sum(m.vocab for m in M.MODALITIES)
    assert own.wte.weight.shape[0] == own.lm_head.weight.shape[0] == rows == 85120
    assert own.get_num_params() - shared.get_num_params() == 2 * (rows - M.VOCAB_SIZE) * 32
    b = random_batch()
    loss, per = run(own, b)
    h = own.decode_hidden(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
    mod = M.position_modality(b["dec_pos"])
    means = []
    for m_idx, m in enumerate(M.MODALITIES):
        sel = b["dec_valid"] & (mod == m_idx)
        if sel.any():
            w = own.lm_head.weight[own.row_offset[m_idx]:own.row_offset[m_idx] + m.vocab]
            ce = F.cross_entropy(h[sel] @ w.t(), b["dec_ids"][sel], reduction="sum")
            torch.testing.assert_close(per[m.name][0], ce.detach(), rtol=1e-5, atol=1e-4)
            means.append(ce / sel.sum())
    torch.testing.assert_close(loss, torch.stack(means).mean(), rtol=1e-5, atol=1e-5)
    loss.backward()
    g = own.lm_head.weight.grad.abs().sum(1)
    for m_idx, m in enumerate(M.MODALITIES):
        start = own.row_offset[m_idx]
        present = bool((b["dec_valid"] & (mod == m_idx)).any())
        assert bool(g[start:start + m.vocab].gt(0).any()) == present, m.name
    # the inputs: id 7 at an rgb and at a depth position read different rows (7 and 16,384 + 7)
    pos = torch.tensor([[M.POS_OFFSETS[0], M.POS_OFFSETS[1]]])
    emb = own.wte(torch.tensor([[7, 7]]) + own.pos_row_offset[pos])
    assert not torch.equal(emb[0, 0], emb[0, 1])
    torch.testing.assert_close(emb[0, 1], own.wte.weight[16384 + 7])


@pytest.mark.parametrize("fast", [False, True])
def test_ignored_targets_are_queried_but_not_scored(fast):
    """A target slot whose id is M.IGNORE_ID (the caption's trailing padding) still takes part in the decoder
    as a query, but neither counts in its modality's mean nor changes the loss whatever it would have held."""
    model, b = tiny(), random_batch()
    model.fast = fast
    ign = b["dec_valid"] & (torch.rand(b["dec_valid"].shape, generator=torch.Generator().manual_seed(3)) < 0.3)
    b["dec_ids"] = torch.where(ign, M.IGNORE_ID, b["dec_ids"])
    loss, per = run(model, b)
    h = model.decode_hidden(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
    mod = M.position_modality(b["dec_pos"])
    means = []
    for m_idx, m in enumerate(M.MODALITIES):
        sel = b["dec_valid"] & ~ign & (mod == m_idx)
        assert int(per[m.name][1]) == int(sel.sum())
        if sel.any():
            means.append(F.cross_entropy(model.modality_logits(h[sel], m_idx), b["dec_ids"][sel]))
    torch.testing.assert_close(loss, torch.stack(means).mean(), rtol=1e-5, atol=1e-5)
    counts = fastpath.target_counts(model, b["dec_pos"], b["dec_valid"], b["dec_ids"])
    assert torch.equal(run(model, b)[0], model(*[b[k] for k in ("enc_ids", "enc_pos", "enc_valid", "dec_pos",
                                                                  "dec_valid", "dec_ids")], counts)[0])


def test_padding_does_not_change_the_result():
    model = tiny()
    b = random_batch()
    loss, _ = run(model, b)
    junk = dict(b)
    for k in ("enc_ids", "enc_pos", "dec_pos", "dec_ids"):
        valid = b["enc_valid"] if k.startswith("enc") else b["dec_valid"]
        hi = 1000 if k.endswith("ids") else M.TOTAL_POSITIONS
        junk[k] = torch.where(valid, b[k], torch.randint_like(b[k], 0, hi))
    loss2, _ = run(model, junk)
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)


def test_decoder_targets_only_see_their_own_modality():
    model = tiny()
    b = random_batch(B=1, No=8)
    b["dec_valid"][:] = True
    b["dec_pos"][0] = torch.tensor([0, 1, 2, 3, M.POS_OFFSETS[3], M.POS_OFFSETS[3] + 1, 5, 6])  # rgb + audio
    args = lambda bb: (bb["enc_ids"], bb["enc_pos"], bb["enc_valid"], bb["dec_pos"], bb["dec_valid"])
    h = model.decode_hidden(*args(b))
    b2 = {k: v.clone() for k, v in b.items()}
    b2["dec_valid"][0, 4:6] = False                        # drop the audio targets
    h2 = model.decode_hidden(*args(b2))
    rgb = [0, 1, 2, 3, 6, 7]
    torch.testing.assert_close(h[0, rgb], h2[0, rgb])
    model.config.dec_same_modality = False                 # the switch really mixes them
    assert not torch.allclose(model.decode_hidden(*args(b))[0, rgb], model.decode_hidden(*args(b2))[0, rgb])


@pytest.mark.parametrize("fast", [False, True])
def test_empty_rows_give_finite_loss_and_grads(fast):
    model = tiny()
    model.fast = fast
    b = random_batch(B=4)
    b["dec_valid"][1] = False          # a sample with zero targets
    b["enc_valid"][2] = False          # a sample with zero inputs (masking forbids it; the model survives it)
    b["enc_valid"][3, 1:] = False      # one input, lots of padding
    loss, per = run(model, b)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # no target anywhere: loss 0, still differentiable
    model.zero_grad()
    b["dec_valid"][:] = False
    loss, per = run(model, b)
    loss.backward()
    assert loss.item() == 0.0 and all(float(c) == 0 for _, c in per.values())


def test_bf16_autocast_keeps_the_head_in_float32():
    model = tiny()
    b = random_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.decode_hidden(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
        logits = model.modality_logits(h[0, :5], 3)
        loss, _ = run(model, b)
    assert logits.dtype == torch.float32 and logits.shape == (5, 2048)
    loss32, _ = run(model, b)
    assert torch.isfinite(loss) and abs(loss.item() - loss32.item()) < 0.05


def test_optimizer_groups_and_mfu(default_model):
    model = tiny(bias=True)
    opt = model.configure_optimizers(0.05, 1e-4, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    big = default_model
    flops = fastpath.flops_per_step(big, 64, 256, 256)
    # the 6 * params * tokens rule, per stream: inputs pass the encoder, targets the decoder and the head
    # (at the mean modality vocab); ours adds attention scores and the cross-attention keys/values
    n_enc = sum(p.numel() for p in big.encoder.parameters())
    n_dec = sum(p.numel() for p in big.decoder.parameters())
    head = 512 * sum(m.vocab for m in M.MODALITIES) / 5
    rule = 6 * 64 * 256 * (n_enc + n_dec + head)
    assert 1.0 < flops / rule < 1.3, flops / rule
    assert fastpath.estimate_mfu(big, 64, 256, 256, 0.02, 989e12) == pytest.approx(flops / 0.02 / 989e12)


@pytest.mark.parametrize("separate", [False, True])
def test_load_checkpoint_round_trip(tmp_path, separate):
    model = tiny(separate_vocab=separate)
    b = random_batch()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": {**TINY, "separate_vocab": separate}, "config": {}}, path)
    loaded, ckpt = load_checkpoint(str(path), "cpu")
    assert not loaded.training and bool((loaded.config.adapters or {}).get("separate_vocab")) == separate
    torch.testing.assert_close(run(loaded, b)[0], run(model, b)[0])
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "nope.pt"))
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a nano4M checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pt"))


def test_warm_start_loads_weights_only_into_a_model_that_agrees():
    """model.warm_start (train.py --init_from=<ckpt.pt>): the weights come over exactly, a setting without weights
    (dropout, cross_local) stays the new run's; another architecture, or weights of another shape, are refused."""
    from model import warm_start
    src = tiny()
    ckpt = {"model": {"_orig_mod." + k: v for k, v in src.state_dict().items()}, "model_args": dict(TINY)}
    new = tiny(dropout=0.1, cross_local=1.0)
    warm_start(new, ckpt)
    assert new.config.dropout == 0.1 and new.config.cross_local == 1.0
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), new.state_dict().values()))
    with pytest.raises(ValueError, match="dec_same_modality: this run False, checkpoint True"):
        warm_start(tiny(dec_same_modality=False), ckpt)
    short = dict(ckpt, model={**ckpt["model"], "_orig_mod.pos_seq": ckpt["model"]["_orig_mod.pos_seq"][:4]})
    with pytest.raises(ValueError, match="do not fit this run's model.*pos_seq"):
        warm_start(tiny(), short)


def test_compile_trunk_keeps_state_dict_keys():
    model = tiny()
    keys = list(model.state_dict())
    model.compile_trunk()
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("separate", [False, True])
def test_per_modality_ce_matches_cross_entropy_with_empty_modalities_and_padding(separate):
    """The fused head gives F.cross_entropy's sums and gradients over each modality's own head rows (a
    shared prefix [0, vocab), or a block of its own); a modality with no rows gives 0, and padding rows
    after the counted ones get no gradient."""
    from fastpath import PerModalityCE
    torch.manual_seed(0)
    vocabs, counts, pad = [50, 30, 30, 10, 80], [7, 0, 5, 3, 1], 4
    starts = [sum(vocabs[:i]) for i in range(5)] if separate else [0] * 5
    n = sum(counts) + pad
    h = torch.randn(n, 16, dtype=torch.float32, requires_grad=True)
    w = torch.randn(sum(vocabs) if separate else 80, 16, requires_grad=True)
    ids = torch.cat([torch.randint(v, (c,)) for v, c in zip(vocabs, counts)] + [torch.zeros(pad, dtype=torch.long)])
    upstream = torch.randn(5)
    sums = PerModalityCE.apply(h, w, ids, counts, list(zip(starts, vocabs)))
    (sums * upstream).sum().backward()
    got_h, got_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref, start = [], 0
    for c, v, w0 in zip(counts, vocabs, starts):
        ref.append(F.cross_entropy(h[start:start + c] @ w[w0:w0 + v].t(), ids[start:start + c], reduction="sum")
                   if c else torch.zeros(()))
        start += c
    ref = torch.stack(ref)
    (ref * upstream).sum().backward()
    assert sums[1].item() == 0.0
    torch.testing.assert_close(sums, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, w.grad, rtol=1e-5, atol=1e-5)
    assert got_h[sum(counts):].abs().max().item() == 0.0


def test_counts_copied_ahead_give_the_same_loss():
    """train.py hands the head its per-modality row counts made when the batch was drawn (target_counts);
    the loss and its parts equal those of the model reading the counts itself."""
    model, b = tiny(), random_batch()
    model.fast = True
    loss_a, parts_a = run(model, b)
    counts = fastpath.target_counts(model, b["dec_pos"], b["dec_valid"], b["dec_ids"])
    loss_b, parts_b = model(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"], b["dec_ids"],
                            counts)
    assert torch.equal(loss_a, loss_b)
    for name in parts_a:
        assert torch.equal(parts_a[name][0], parts_b[name][0]) and torch.equal(parts_a[name][1], parts_b[name][1])


def test_block_lr_scale_splits_groups_and_train_scales_them():
    """block_lr_scale gives the encoder/decoder blocks their own groups at a fraction of the lr; every other
    parameter keeps the full lr; weight decay still only on matrices."""
    model = tiny(bias=True)
    opt = model.configure_optimizers(0.05, 2e-3, (0.9, 0.95), "cpu", block_lr_scale=0.25)
    blocks = {id(p) for n, p in model.named_parameters() if n.startswith(("encoder.", "decoder."))}
    seen = 0
    for g in opt.param_groups:
        in_blocks = {id(p) in blocks for p in g["params"]}
        assert len(in_blocks) == 1
        assert g["lr_scale"] == (0.25 if in_blocks.pop() else 1.0) and g["lr"] == 2e-3 * g["lr_scale"]
        assert g["weight_decay"] == (0.05 if g["params"][0].dim() >= 2 else 0.0)
        assert all((p.dim() >= 2) == (g["params"][0].dim() >= 2) for p in g["params"])
        seen += len(g["params"])
    assert seen == len(list(model.parameters())) and len(opt.param_groups) == 4


def test_code_features_embed_what_each_id_stands_for(tmp_path):
    """--code_features: an rgb / audio token's input embedding adds a learnt map of its id's tokenizer vector."""
    dims = (6, 0, 0, 4, 0)                                     # rgb and audio featured
    model = tiny(code_feature_dims=dims)
    g = torch.Generator().manual_seed(0)
    rgb = torch.randn(100, 6, generator=g)
    rgb[7] = rgb[3]                                          # two ids that decode to the same patch
    audio = torch.zeros(2048, 4)
    audio[:50] = torch.randn(50, 4, generator=g)             # ids past a small codebook: zero rows
    model.adapters.set_code_features({"tok_rgb": rgb, "tok_audio": audio})
    f = model.adapters.code_feat_tok_rgb
    assert f.shape == (M.BY_NAME["tok_rgb"].vocab, 6) and f[100:].abs().sum() == 0
    torch.testing.assert_close(f[:100].mean(0), torch.zeros(6), atol=1e-5, rtol=0)      # standardised
    torch.testing.assert_close(f[:100].std(0), torch.full((6,), 6 ** -0.5))
    assert model.adapters.code_feat_tok_audio[50:].abs().sum() == 0
    rgb_pos = torch.tensor([[0, 1]])                          # rgb positions come first
    e = model.adapters.code_embedding(torch.tensor([[3, 7]]), rgb_pos)
    torch.testing.assert_close(e[0, 0], e[0, 1])
    torch.testing.assert_close(e[0, 0], model.adapters.code_proj["tok_rgb"](f[3]))
    cap_pos = torch.tensor([[M.TOTAL_POSITIONS - 1]])         # the caption has no features: zero
    assert model.adapters.code_embedding(torch.tensor([[3]]), cap_pos).abs().sum() == 0
    # it reaches the loss, and the map learns
    b = random_batch()
    b["enc_ids"] = b["enc_ids"] % 50                         # ids that have vectors, in every modality
    run(model, b)[0].backward()
    assert model.adapters.code_proj["tok_rgb"].weight.grad.abs().sum() > 0
    assert model.adapters.code_proj["tok_audio"].weight.grad.abs().sum() > 0
    # the vectors are saved with the model
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": {**TINY, "code_feature_dims": dims}}, path)
    loaded, _ = load_checkpoint(str(path))
    assert torch.equal(loaded.adapters.code_feat_tok_rgb, f)
    torch.testing.assert_close(run(loaded, b)[0], run(model.eval(), b)[0])
    with pytest.raises(ValueError, match="tok_audio"):
        model.adapters.set_code_features({"tok_rgb": rgb})
    with pytest.raises(ValueError, match="shape"):
        model.adapters.set_code_features({"tok_rgb": rgb[:, :5], "tok_audio": audio})
    with pytest.raises(ValueError, match="one entry per modality"):
        tiny(code_feature_dims=(6, 4))


@pytest.mark.parametrize("separate_vocab", [False, True])
def test_feature_only_inputs_read_no_id_row(separate_vocab):
    """feature_only=('tok_rgb',): an rgb input is its code-feature map alone (its id row is never read, two
    ids with one vector are one input); other modalities still read their rows; the head is unchanged."""
    dims = (6, 0, 0, 4, 0)
    model = tiny(code_feature_dims=dims, feature_only=("tok_rgb",), separate_vocab=separate_vocab).eval()
    g = torch.Generator().manual_seed(1)
    rgb = torch.randn(M.BY_NAME["tok_rgb"].vocab, 6, generator=g)
    rgb[7] = rgb[3]
    model.adapters.set_code_features({"tok_rgb": rgb, "tok_audio": torch.randn(2048, 4, generator=g)})
    b = random_batch()
    args = (b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
    h0 = model.decode_hidden(*args)
    rgb_rows = slice(model.row_offset[0], model.row_offset[0] + M.BY_NAME["tok_rgb"].vocab)
    with torch.no_grad():
        model.wte.weight[rgb_rows] += 1.0                    # every row an rgb id could read
    torch.testing.assert_close(model.decode_hidden(*args), h0)
    enc_audio = M.position_modality(b["enc_pos"]) == M.MODALITY_NAMES.index("tok_audio")
    assert (enc_audio & b["enc_valid"]).any()
    a0 = model.row_offset[3]
    with torch.no_grad():
        model.wte.weight[a0:a0 + 2048] += 1.0                  # audio still reads its rows
    assert not torch.allclose(model.decode_hidden(*args), h0)
    # an rgb-only input: ids 3 and 7 decode to the same patch, so they are the same input
    pos = torch.tensor([[0, 1]])
    one = lambda i: model.decode_hidden(torch.tensor([[i, 5]]), pos, torch.ones(1, 2, dtype=torch.bool),
                                        torch.tensor([[M.TOTAL_POSITIONS - 1]]), torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(one(3), one(7))
    assert not torch.allclose(one(3), one(4))
    with pytest.raises(ValueError, match="tok_depth"):
        tiny(code_feature_dims=dims, feature_only=("tok_depth",))   # no features to read
    with pytest.raises(ValueError, match="'rgb'"):
        tiny(code_feature_dims=dims, feature_only=("rgb",))         # not a modality name


def test_grid_conv_is_each_grids_cnn_read_back_at_its_cells():
    """grid_conv=True: each valid image input gets its modality's CNN over the dense 14x14 grid of the valid
    inputs' content (zeros elsewhere), read at its own cell; padding, audio and caption tokens get nothing;
    the inputs' order does not matter; the CNNs train at the blocks' learning rate."""
    model = tiny(grid_conv=True).eval()
    assert set(model.adapters.grid_conv) == {"tok_rgb", "tok_depth", "tok_normal"}
    b = random_batch(seed=3)
    B, Ni, D = b["enc_ids"].shape + (32,)
    content = torch.randn(B, Ni, D, generator=torch.Generator().manual_seed(0))
    got = model.adapters.grid_features(content, b["enc_pos"], b["enc_valid"])
    mod = M.position_modality(b["enc_pos"])
    for s in range(B):
        for k, name in enumerate(("tok_rgb", "tok_depth", "tok_normal")):
            keep = b["enc_valid"][s] & (mod[s] == k)
            cells = b["enc_pos"][s][keep] - M.POS_OFFSETS[k]
            if len(cells) == 0 or len(set(cells.tolist())) < len(cells):   # duplicates only in random batches
                continue
            grid = torch.zeros(M.GRID * M.GRID, D)
            grid[cells] = content[s][keep]
            want = model.adapters.grid_conv[name](grid.t().reshape(1, D, M.GRID, M.GRID)).reshape(D, -1).t()[cells]
            torch.testing.assert_close(got[s][keep], want)
        other = ~b["enc_valid"][s] | (mod[s] >= 3)
        assert other.any() and (got[s][other] == 0).all()
    # a sample with no image input (a whole-audio sample) changes nothing for the others: on a CPU the CNNs
    # skip it, and its own audio / caption tokens still get nothing
    no_image = b["enc_valid"].clone()
    no_image[0] &= mod[0] >= 3
    assert (no_image[0] != b["enc_valid"][0]).any()
    skipped = model.adapters.grid_features(content, b["enc_pos"], no_image)
    torch.testing.assert_close(skipped[1:], got[1:])
    assert (skipped[0] == 0).all()
    # ... and a batch with no image input at all still gives every CNN weight a (zero) gradient, as DDP needs
    model.zero_grad(set_to_none=True)
    model.adapters.grid_features(content.requires_grad_(), b["enc_pos"], b["enc_valid"] & (mod >= 3)).sum().backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.adapters.grid_conv.parameters())
    content = content.detach()
    perm = torch.randperm(Ni, generator=torch.Generator().manual_seed(1))
    again = model.adapters.grid_features(content[:, perm], b["enc_pos"][:, perm], b["enc_valid"][:, perm])
    if all(len(set(p.tolist())) == Ni for p in b["enc_pos"]):
        torch.testing.assert_close(again, got[:, perm])
    # the model runs with it, and its parameters sit in the blocks' lr group
    loss, _ = run(model.train(), b)
    assert torch.isfinite(loss)
    groups = model.configure_optimizers(0.05, 1e-3, (0.9, 0.95), "cpu", block_lr_scale=0.25).param_groups
    conv_ids = {id(p) for p in model.adapters.grid_conv.parameters()}
    assert all(g["lr_scale"] == 0.25 for g in groups if conv_ids & {id(p) for p in g["params"]})
    assert tiny().adapters is None                                          # off by default: the report's model


def test_init_choice_sets_the_linear_spread_and_refuses_unknown_names():
    g, t = tiny(), tiny(init="torch")
    fc = lambda m: m.encoder[0].mlp.fc.weight            # fan_in 32
    proj = lambda m: m.encoder[0].mlp.proj.weight        # a residual projection, fan_in 128
    assert abs(fc(g).std().item() - 0.02) < 0.003
    assert abs(proj(g).std().item() - 0.02 / math.sqrt(2 * 1 + 3 * 2)) < 0.002
    # PyTorch's Linear init: uniform +-1/sqrt(fan_in), std 1/sqrt(3 fan_in)
    assert abs(fc(t).std().item() - 1 / math.sqrt(3 * 32)) < 0.01
    assert abs(proj(t).std().item() - 1 / math.sqrt(3 * 128)) < 0.005
    assert fc(t).abs().max().item() <= 1 / math.sqrt(32)
    # the embeddings keep N(0, 0.02) either way
    assert abs(t.wte.weight.std().item() - 0.02) < 0.001
    b = random_batch()
    assert torch.isfinite(run(t, b)[0])
    with pytest.raises(ValueError, match="init="):
        tiny(init="xavier")


@pytest.mark.parametrize("fast", [False, True])   # F.cross_entropy, and fastpath's chunked FullVocabCE
@pytest.mark.parametrize("separate", [False, True])
def test_full_vocab_head_is_one_softmax_over_every_row(separate, fast):
    """head='full' (the report's head): each target's CE is over all the head's rows (50,304 shared, or the
    85,120 separate ones), averaged per modality then over the modalities, with the same gradients as
    F.cross_entropy on the whole logits; the per-modality head scores the same hidden states lower (fewer
    competitors), so the two heads' CEs are different quantities."""
    model = tiny(head="full", separate_vocab=separate)
    model.fast = fast
    b = random_batch()
    b["dec_ids"][0, 0] = M.IGNORE_ID                                       # a queried, unscored target
    loss, per = run(model, b)
    h = model.decode_hidden(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
    logits = h @ model.lm_head.weight.t()
    assert logits.shape[-1] == (sum(VOCABS.tolist()) if separate else M.VOCAB_SIZE)
    mod = M.position_modality(b["dec_pos"])
    offset = torch.tensor(model.row_offset)[mod]
    means, restricted = [], []
    for m_idx, m in enumerate(M.MODALITIES):
        sel = b["dec_valid"] & (mod == m_idx) & (b["dec_ids"] >= 0)
        if not sel.any():
            assert per[m.name][1] == 0
            continue
        ce = F.cross_entropy(logits[sel], b["dec_ids"][sel] + offset[sel], reduction="sum")
        torch.testing.assert_close(per[m.name][0], ce.detach(), rtol=1e-4, atol=1e-3)
        assert per[m.name][1] == sel.sum()
        means.append(ce / sel.sum())
        own = logits[sel][:, model.row_offset[m_idx]:model.row_offset[m_idx] + m.vocab]
        restricted.append((F.cross_entropy(own, b["dec_ids"][sel]), m.vocab < logits.shape[-1]))
    ref = torch.stack(means).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for (r, fewer), f in zip(restricted, means):       # the caption spans all 50,304 shared rows: equal
        assert r < f - 1e-3 if fewer else abs(r - f) < 1e-4, (r, f)
    # the gradients of the chunked autograd function are those of the plain full softmax
    w_grad = torch.autograd.grad(loss, model.lm_head.weight, retain_graph=True)[0]
    w_ref = torch.autograd.grad(ref, model.lm_head.weight)[0]
    torch.testing.assert_close(w_grad, w_ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="head="):
        tiny(head="joint")


def test_sincos_positions_are_one_fixed_table_over_the_flat_position():
    """pos_emb='sincos' (the report's code): the position part of every token is row p of one fixed 1-D
    sin-cos table, p the flat global position, the same table whatever the modality; no learnt position
    parameters remain, and nothing of it is saved in the state dict."""
    model = tiny(pos_emb="sincos")
    table = model.position_table()
    assert table.shape == (M.TOTAL_POSITIONS, 32) and not table.requires_grad
    p, i = 700, 3                                     # an audio position; dims i (sin) and 16 + i (cos)
    freq = 10000.0 ** (-i / 16)
    assert table[p, i].item() == pytest.approx(math.sin(p * freq), abs=1e-5)
    assert table[p, 16 + i].item() == pytest.approx(math.cos(p * freq), abs=1e-5)
    assert not any(n.startswith("pos_") for n, _ in model.named_parameters())
    assert not any(k.startswith("pos_") for k in model.state_dict())
    learned = tiny()
    assert learned.get_num_params() - model.get_num_params() == 32 * (2 * M.GRID + M.AUDIO_FRAMES +
                                                                       M.AUDIO_CODEBOOKS + M.CAPTION_LEN)
    loss, _ = run(model, random_batch())
    loss.backward()
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match="pos_emb="):
        tiny(pos_emb="rope")


def test_sincos_layout_positions_align_the_grids_and_the_audio_frames():
    """pos_emb='sincos_layout': the three image grids share one fixed 2-D table, so rgb cell p and depth cell p
    get the same position part; a cell is most like itself, then a row / column neighbour, then a diagonal
    one, then a far cell. Audio frames get a fixed 1-D table alike (near frames alike, far ones not) plus the
    learnt codebook rows. Nothing fixed is learnt or saved."""
    model = tiny(pos_emb="sincos_layout")
    table = model.position_table().detach()
    start = {n: M.POS_OFFSETS[M.modality_index(n)] for n in ("tok_rgb", "tok_depth", "tok_normal", "tok_audio")}
    cells = M.GRID * M.GRID
    grid = table[start["tok_rgb"]:start["tok_rgb"] + cells]
    for name in ("tok_depth", "tok_normal"):
        assert torch.equal(table[start[name]:start[name] + cells], grid)
    sim = grid @ grid.t()
    torch.testing.assert_close(sim.diagonal(), torch.ones(cells))
    c = 5 * M.GRID + 5
    assert sim[c, c] > sim[c, c + 1] > sim[c, c + M.GRID + 1] > sim[c, cells - 1]
    assert sim[c, c + 1] == pytest.approx(sim[c, c + M.GRID].item(), abs=1e-5)   # rows and columns alike
    K = M.AUDIO_CODEBOOKS
    frames = model.pos_frame
    assert frames.shape == (M.AUDIO_FRAMES, 32) and not frames.requires_grad
    f = frames @ frames.t()
    assert f[100, 100] > f[100, 101] > f[100, 102] > 0.3 > abs(f[100, 150])
    audio = table[start["tok_audio"]:start["tok_audio"] + M.AUDIO_FRAMES * K].view(M.AUDIO_FRAMES, K, -1)
    torch.testing.assert_close(audio[:, 1] - audio[:, 0], (model.pos_codebook[1] - model.pos_codebook[0]).detach()
                               .expand(M.AUDIO_FRAMES, -1))
    names = {n for n, _ in model.named_parameters()}
    assert {"pos_codebook", "pos_seq"} <= names and not names & {"pos_row", "pos_col", "pos_frame"}
    assert not any(k.startswith(("pos_grid", "pos_frame")) for k in model.state_dict())
    assert tiny().get_num_params() - model.get_num_params() == 32 * (2 * M.GRID + M.AUDIO_FRAMES)
    loss, _ = run(model, random_batch())
    loss.backward()
    assert math.isfinite(loss.item())


def test_mimetic_cross_starts_queries_on_like_keys():
    """mimetic_cross=s adds s * I to every decoder cross-attention's W_q and W_k (the keys' half of kv) and
    changes nothing else: the same random draws, the same other weights."""
    torch.manual_seed(0)
    plain = tiny()
    torch.manual_seed(0)
    mim = tiny(mimetic_cross=2.0)
    eye = torch.eye(32) * 2.0
    for a, b in zip(plain.decoder, mim.decoder):
        torch.testing.assert_close(b.cross_attn.q.weight, a.cross_attn.q.weight + eye)
        torch.testing.assert_close(b.cross_attn.kv.weight[:32], a.cross_attn.kv.weight[:32] + eye)
        torch.testing.assert_close(b.cross_attn.kv.weight[32:], a.cross_attn.kv.weight[32:])
    changed = {n for (n, p), (_, q) in zip(plain.named_parameters(), mim.named_parameters()) if not torch.equal(p, q)}
    assert changed == {f"decoder.{i}.cross_attn.{w}.weight" for i in range(len(mim.decoder)) for w in ("q", "kv")}


def test_cross_local_heads_look_at_their_own_place_whatever_the_weights():
    """cross_local=s: with queries that carry nothing (W_q = 0), the first half of the heads still put their mass
    on the query's own place (the depth cell's rgb 3x3; the masked audio frame's given neighbours), the other half
    attend uniformly; s = 0 is the model as it was. The packed path steps aside (same numbers as padded)."""
    import evaluate as E
    torch.manual_seed(0)
    plain, local = tiny(n_head=2), tiny(n_head=2, cross_local=4.0)
    b = random_batch()
    torch.testing.assert_close(run(plain, b)[0], run(tiny(n_head=2, cross_local=0.0), b)[0])
    for m in (plain, local):
        for block in m.decoder:
            block.cross_attn.q.weight.data.zero_()
    rgb = torch.randint(0, M.BY_NAME["tok_rgb"].vocab, (2, M.GRID * M.GRID))
    inputs, cells = {"tok_rgb": (rgb, torch.ones_like(rgb, dtype=torch.bool))}, torch.arange(M.GRID * M.GRID)
    tokens = {"tok_audio": torch.randint(0, M.BY_NAME["tok_audio"].vocab, (2, M.BY_NAME["tok_audio"].length)),
              "caption": torch.randint(0, 50, (2, M.CAPTION_LEN))}
    with torch.no_grad():
        look = lambda m: E.cross_attention_locality(m, inputs, "tok_depth", cells, E.near_place("tok_rgb", 1), "cpu")
        assert look(plain)["near"] == pytest.approx(look(plain)["uniform_near"], abs=1e-6)
        assert look(local)["near"] > 0.9 and E.audio_infill_locality(local, tokens, "cpu")["near"] > 0.8
        e_ids, e_pos, e_valid = generation.pack_inputs(inputs, "cpu")
        mask = local.cross_attn_mask(e_pos, e_valid, (M.POS_OFFSETS[M.modality_index("tok_depth")] + cells)[None])
        assert mask.shape == (2, 2, 196, 196) and (mask[:, 1] == 0).all()     # the second head: no bias
        assert mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 1] == -4.0 and mask[0, 0, 0, -1] == -4.0 * 8   # FAR = 8
        local.packed = True
        packed_loss = run(local, b)[0]
        local.packed = False
        torch.testing.assert_close(packed_loss, run(local, b)[0])


def test_checkpoints_from_before_adapters_py_still_load(tmp_path):
    """A checkpoint written before adapters.py (main's layout: the adapter switches flat in model_args, their
    weights at the top level of the state dict, the masking settings flat in config) loads to the same model,
    and its masking settings read back (masking.MaskingConfig.from_settings)."""
    from masking import MaskingConfig
    dims = (6, 0, 0, 4, 0)
    model = tiny(separate_vocab=True, code_feature_dims=dims, feature_only=("tok_rgb",), grid_conv=True,
                 init="torch").eval()
    g = torch.Generator().manual_seed(0)
    model.adapters.set_code_features({"tok_rgb": torch.randn(100, 6, generator=g),
                                      "tok_audio": torch.randn(2048, 4, generator=g)})
    old_state = {k.removeprefix("adapters."): v for k, v in model.state_dict().items()}
    assert "code_feat_tok_rgb" in old_state and "grid_conv.tok_rgb.0.weight" in old_state
    old_args = {**TINY, "separate_vocab": True, "code_feature_dims": dims, "feature_only": ("tok_rgb",),
                "grid_conv": True, "init": "torch"}
    old_config = {"dataset": "toyzoo", "input_budget": (8, 64), "target_budget": (4, 16), "mixture_per_batch": True,
                  "separate_vocab": True, "code_features": True}
    torch.save({"model": old_state, "model_args": old_args, "config": old_config}, tmp_path / "ckpt.pt")
    loaded, ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert loaded.config.adapters["separate_vocab"] and loaded.config.adapters["code_feature_dims"] == dims
    b = random_batch()
    torch.testing.assert_close(run(loaded, b)[0], run(model, b)[0], rtol=0, atol=0)
    cfg = MaskingConfig.from_settings(ckpt["config"])
    assert cfg == MaskingConfig(input_budget=(8, 64), target_budget=(4, 16), mixture_per_batch=True)
    assert MaskingConfig.from_settings({"masking": {"target_budget": (4, 16)}}) == MaskingConfig(target_budget=(4, 16))
    with pytest.raises(ValueError, match="unknown masking setting.*input_budgett"):
        MaskingConfig.from_settings({"masking": {"input_budgett": (1, 2)}})


def test_adapters_come_after_the_reports_weights():
    """The adapters are made after the report's model's own modules, as their weights were before adapters.py:
    their parameters come last (the optimizer's order in checkpoints from before adapters.py), and an
    init='gpt2' model gets the same init either way, so a seed gives what it gave before the move."""
    plain, toy = tiny(), tiny(separate_vocab=False, grid_conv=True, code_feature_dims=(6, 0, 0, 4, 0))
    names, n = [n for n, _ in toy.named_parameters()], len(list(plain.parameters()))
    assert names[:n] == [n for n, _ in plain.named_parameters()]
    assert names[n:] and all(n.startswith("adapters.") for n in names[n:])
    fc = dict(toy.named_parameters())["encoder.0.mlp.fc.weight"]
    assert abs(fc.std().item() - 0.02) < 0.003                         # GPT-2's init reaches the blocks


@pytest.mark.parametrize("fast", [False, True])
def test_factored_head_scores_a_product_code_by_its_two_factors(fast):
    """adapters' factored_head: a product-coded modality's targets (id = a * Ks + b) are scored by a softmax over
    the Km means plus one over the Ks shapes, from the first Km + Ks rows of its head block. Its logits over the
    ids are a[id // Ks] + b[id % Ks], so their softmax is p(a) p(b) and the loss is exactly the CE of those
    logits; the plain and the fast path agree, and only those rows of the block get a gradient. A smaller code
    (Km * Ks < vocab) leaves the ids past it with no probability."""
    Km, Ks = 128, 64
    model = tiny(adapters=dict(separate_vocab=True, factored_head=(("tok_depth", Km, Ks), ("tok_normal", 8, 32))))
    model.fast = fast
    b = random_batch(B=4, No=40)
    normal = M.modality_index("tok_normal")
    mod = M.position_modality(b["dec_pos"])
    b["dec_ids"] = torch.where(mod == normal, b["dec_ids"] % 256, b["dec_ids"])   # inside its 8 x 32 code
    loss, per = run(model, b)
    h = model.decode_hidden(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
    means = []
    for m_idx, m in enumerate(M.MODALITIES):
        sel = b["dec_valid"] & (mod == m_idx)
        if not sel.any():
            continue
        logits = model.modality_logits(h[sel], m_idx)
        assert logits.shape == (int(sel.sum()), m.vocab)
        ce = F.cross_entropy(logits, b["dec_ids"][sel], reduction="sum")
        torch.testing.assert_close(per[m.name][0], ce.detach(), rtol=1e-5, atol=1e-3)
        means.append(ce / sel.sum())
    torch.testing.assert_close(loss, torch.stack(means).mean(), rtol=1e-5, atol=1e-5)
    depth = M.modality_index("tok_depth")
    sel = b["dec_valid"] & (mod == depth)
    p = torch.softmax(model.modality_logits(h[sel], depth), -1).view(-1, Km, Ks)
    torch.testing.assert_close(p, p.sum(2, keepdim=True) * p.sum(1, keepdim=True), rtol=1e-4, atol=1e-7)
    p_normal = torch.softmax(model.modality_logits(h[b["dec_valid"] & (mod == normal)], normal), -1)
    assert float(p_normal[:, 256:].sum().detach()) == 0.0
    loss.backward()
    g = model.lm_head.weight.grad.abs().sum(1)
    start = model.row_offset[depth]
    assert g[start:start + Km + Ks].gt(0).any() and not g[start + Km + Ks:start + Km * Ks].gt(0).any()
    with pytest.raises(ValueError, match="separate_vocab"):
        tiny(adapters=dict(factored_head=(("tok_depth", Km, Ks),)))


def test_gradients_are_the_same_every_run_on_a_multi_threaded_cpu():
    """A seed gives the same curve twice: the backward of the position lookup sums repeated positions in a fixed
    order (indexing's backward did not on 2 threads: the position tables' gradients changed from run to run)."""
    model, b = tiny(n_embd=64), random_batch(B=64, Ni=128, No=128)
    b["enc_valid"], b["dec_valid"] = b["enc_valid"] | True, b["dec_valid"] | True   # every row full: many repeats
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            run(model, b)[0].backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert [n for n in g if not torch.equal(g[n], grads[0][n])] == []
