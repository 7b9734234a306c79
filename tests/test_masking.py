"""Tests for masking.py: budgets, disjointness, ids/positions, audio spans, mixtures, statistics."""
import os
import sys

import pytest
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import masking as K  # noqa: E402
import modalities as M  # noqa: E402
import streams as S  # noqa: E402


def sample_dirichlet(alpha, generator=None):
    """masking.dirichlet with its own random numbers."""
    shape = (K.GAMMA_ROUNDS,) + tuple(alpha.shape)
    x, u = torch.randn(shape, generator=generator), torch.rand(shape, generator=generator)
    return K.dirichlet(alpha, x, u, torch.rand(alpha.shape, generator=generator))


def sample_gamma_log(alpha, generator=None):
    """masking.gamma_log with its own random numbers."""
    shape = (K.GAMMA_ROUNDS,) + tuple(alpha.shape)
    x, u = torch.randn(shape, generator=generator), torch.rand(shape, generator=generator)
    return K.gamma_log(alpha, x, u, torch.rand(alpha.shape, generator=generator))


N = 2000  # samples per statistical check (one vectorized batch)
AUDIO, CAPTION = K.AUDIO, K.CAPTION


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the tensors here are small; intra-op threads only fight the other test processes for the cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(cfg, B=N, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    toks = K.random_tokens(B, device, g)
    return toks, K.build_batch(toks, cfg, g)


def chosen_masks(batch, prefix):
    """[B, TOTAL_POSITIONS] bool of the chosen global positions (padding slots excluded)."""
    pos, valid = batch[prefix + "_pos"], batch[prefix + "_valid"]
    out = torch.zeros(pos.shape[0], M.TOTAL_POSITIONS + 1, dtype=torch.long)
    out.scatter_add_(1, torch.where(valid, pos, M.TOTAL_POSITIONS), torch.ones_like(pos))
    return out[:, :M.TOTAL_POSITIONS]  # counts, so a duplicate would show as 2


def per_modality(mask):
    return torch.stack([mask[:, o:o + m.length].sum(1) for o, m in zip(M.POS_OFFSETS, M.MODALITIES)], 1)


def valid_all(toks):
    v = torch.ones(toks["tok_rgb"].shape[0], M.TOTAL_POSITIONS, dtype=torch.bool)
    v[:, M.POS_OFFSETS[CAPTION]:] = M.caption_valid(toks["caption"])
    return v


def runs(mask):
    """Number of contiguous runs of True per row."""
    return mask[:, 0].long() + (mask[:, 1:] & ~mask[:, :-1]).sum(1)


def check_structure(toks, batch, cfg):
    B = toks["tok_rgb"].shape[0]
    assert batch["enc_ids"].shape == (B, cfg.max_input_tokens)
    assert batch["dec_ids"].shape == (B, cfg.max_target_tokens)
    ids_all = torch.cat([toks[n] for n in M.MODALITY_NAMES], 1)
    cap = toks["caption"]
    # as targets, the caption's padding after its first end-of-text is queried but not scored
    tgt_all = torch.cat([ids_all[:, :-M.CAPTION_LEN], torch.where(M.caption_scored(cap), cap, M.IGNORE_ID)], 1)
    for p, want in (("enc", ids_all), ("dec", tgt_all)):
        ids, pos, valid = batch[p + "_ids"], batch[p + "_pos"], batch[p + "_valid"]
        assert ids.dtype == pos.dtype == torch.long and valid.dtype == torch.bool
        # ids are the tokens at the positions; padding is 0
        assert torch.equal(ids, torch.where(valid, want.gather(1, pos), 0))
        assert (pos[~valid] == 0).all() and (ids[~valid] == 0).all()
        # valid slots first, positions strictly increasing (modality order, then position order)
        n = valid.sum(1, keepdim=True)
        assert torch.equal(valid, torch.arange(valid.shape[1]) < n)
        inc = (pos[:, 1:] > pos[:, :-1]) | ~valid[:, 1:]
        assert inc.all()
    enc, dec = chosen_masks(batch, "enc"), chosen_masks(batch, "dec")
    assert enc.max() <= 1 and dec.max() <= 1
    assert not (enc.bool() & dec.bool()).any(), "inputs and targets overlap"
    # caption padding is never chosen
    assert not ((enc + dec).bool() & ~valid_all(toks)).any()
    # audio frames stay whole
    a0 = M.POS_OFFSETS[AUDIO]
    for m in (enc, dec):
        fr = m[:, a0:a0 + 512].view(B, 256, 2)
        assert torch.equal(fr[:, :, 0], fr[:, :, 1]), "an audio frame was split"
    return enc.bool(), dec.bool()


def test_default_batch_structure_and_budgets():
    cfg = K.MaskingConfig()
    assert (cfg.max_input_tokens, cfg.max_target_tokens) == (256, 256)
    toks, b = run(cfg)
    enc, dec = check_structure(toks, b, cfg)
    n_in, n_t = enc.sum(1), dec.sum(1)
    # enough room everywhere for the default budgets: totals within the ranges (audio parity can only
    # lose a token when no other modality has room, which does not happen here)
    assert n_in.min() >= 16 and n_in.max() <= 256 and n_t.min() >= 16 and n_t.max() <= 256
    # uniform budget: mean ~ 136, spread over the whole range
    assert abs(n_in.float().mean() - 136) < 5 and abs(n_t.float().mean() - 136) < 5
    assert n_in.min() < 30 and n_in.max() > 240


def test_exact_budgets_without_clamping():
    # caption off (alpha 0), budgets below a grid's 196 tokens: no modality can overflow
    cfg = K.MaskingConfig(input_budget=(101, 101), target_budget=(77, 77), input_alphas=(1, 1, 1, 1, 0),
                          target_alphas=(1, 2, 1, 3, 0))
    toks, b = run(cfg)
    enc, dec = check_structure(toks, b, cfg)
    assert (enc.sum(1) == 101).all() and (dec.sum(1) == 77).all()
    assert (per_modality(enc)[:, CAPTION] == 0).all() and (per_modality(dec)[:, CAPTION] == 0).all()
    assert (per_modality(enc)[:, AUDIO] % 2 == 0).all() and (per_modality(dec)[:, AUDIO] % 2 == 0).all()


def test_allocation_follows_dirichlet_mean():
    alphas = (0.5, 1.0, 2.0, 4.0, 0.0)
    cfg = K.MaskingConfig(input_budget=(120, 120), target_budget=(16, 16), input_alphas=alphas)
    toks, b = run(cfg)
    share = per_modality(chosen_masks(b, "enc").bool()).float().mean(0) / 120
    expect = torch.tensor(alphas) / sum(alphas)
    assert torch.allclose(share, expect, atol=0.02), (share, expect)


def test_dirichlet_and_gamma_statistics():
    g = torch.Generator().manual_seed(1)
    alpha = torch.tensor([0.05, 0.5, 1.0, 2.0, 0.0]).expand(20000, 5)
    p = sample_dirichlet(alpha, g).float()
    assert torch.allclose(p.sum(1), torch.ones(20000), atol=1e-5)
    assert (p[:, 4] == 0).all()
    assert torch.allclose(p.mean(0), alpha[0] / alpha[0].sum(), atol=0.01)
    # Dirichlet variance of component i: a_i (a0 - a_i) / (a0^2 (a0 + 1))
    a0 = alpha[0].sum()
    var = alpha[0] * (a0 - alpha[0]) / (a0 ** 2 * (a0 + 1))
    assert torch.allclose(p.var(0), var, rtol=0.1, atol=1e-4)
    for a in (0.3, 1.0, 7.0):
        x = sample_gamma_log(torch.full((50000,), a), g).exp()
        assert abs(x.mean() - a) < 0.03 * a + 0.01 and abs(x.var() - a) < 0.08 * a + 0.01
    # all-zero row -> zeros, not NaN
    assert (sample_dirichlet(torch.zeros(3, 5), g) == 0).all()


def test_allocate_water_filling_and_audio_parity():
    p = torch.tensor([[0.7, 0.1, 0.2, 0.0, 0.0]], dtype=torch.float64)
    cap = torch.tensor([[20, 196, 196, 512, 6]])
    # rgb is capped at 20; the 80 it cannot take go to depth/normal 1:2 (26.7 / 53.3), the remainder token
    # to the largest fractional part
    assert K.allocate(torch.tensor([100]), p, cap).tolist() == [[20, 27, 53, 0, 0]]
    # audio 6.6 -> 7 by largest remainder, odd: its odd token moves to the caption (which has room)
    p = torch.tensor([[0.0, 0.0, 0.0, 0.6, 0.4]], dtype=torch.float64)
    assert K.allocate(torch.tensor([11]), p, cap).tolist() == [[0, 0, 0, 6, 5]]
    # nothing else has room: audio rounds down (total one short), or up when min_total asks for it
    assert K.allocate(torch.tensor([15]), p, cap).tolist() == [[0, 0, 0, 8, 6]]
    p = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    assert K.allocate(torch.tensor([1]), p, cap, torch.tensor([1])).tolist() == [[0, 0, 0, 2, 0]]
    # more asked than there is: everything with a positive share, nothing for a zero share
    p = torch.tensor([[0.2, 0.2, 0.0, 0.3, 0.3]], dtype=torch.float64)
    assert K.allocate(torch.tensor([5000]), p, cap).tolist() == [[20, 196, 0, 512, 6]]


def test_zero_alpha_gives_nothing():
    cfg = K.MaskingConfig(input_alphas=(1, 1, 0, 1, 1), target_alphas=(0, 1, 1, 1, 0),
                          input_budget=(200, 256), target_budget=(200, 256))
    toks, b = run(cfg)
    enc, dec = check_structure(toks, b, cfg)
    assert (per_modality(enc)[:, 2] == 0).all()
    assert (per_modality(dec)[:, 0] == 0).all() and (per_modality(dec)[:, CAPTION] == 0).all()
    assert (per_modality(enc)[:, 0] > 0).float().mean() > 0.9


def test_audio_spans_contiguous():
    cfg = K.MaskingConfig(input_alphas=(0, 0, 0, 1, 0), target_alphas=(0, 0, 0, 1, 0),
                          input_budget=(2, 300), target_budget=(2, 200), audio_spans=(1, 3))
    toks, b = run(cfg)
    enc, dec = check_structure(toks, b, cfg)
    a0 = M.POS_OFFSETS[AUDIO]
    fin = enc[:, a0:a0 + 512:2]
    ftg = dec[:, a0:a0 + 512:2]
    # inputs: at most 3 runs; targets: at most 3 spans, each may be cut by the input spans between them
    assert runs(fin).max() <= 3 and runs(ftg).max() <= 6
    assert runs(fin).float().mean() > 1.5  # several spans do occur
    # audio-only budgets: the counts are the drawn budgets rounded to whole frames
    assert (enc.sum(1) % 2 == 0).all() and enc.sum(1).min() >= 2 and dec.sum(1).max() <= 200
    # spans land everywhere on the axis, symmetrically (placement is not stuck at one end)
    for f in (fin, ftg):
        cover = f.float().mean(0)
        assert (cover[16:-16] > 0.05).all() and abs(cover[:64].mean() - cover[-64:].mean()) < 0.03


def test_audio_spans_per_component():
    """A component may scatter its audio frames (many spans, as MaskGIT's decoding leaves them) while another
    keeps the top-level contiguous spans; the batch tells them apart by their run counts."""
    audio_only = (0, 0, 0, 1, 0)
    scattered = dict(weight=1.0, input_full=("caption",), input_alphas=audio_only, input_budget=(100, 400),
                     target_full=("audio",), target_alphas=(0.0,) * 5, target_budget=(0, 0), audio_spans=(64, 128))
    plain = dict(weight=1.0, input_alphas=audio_only, target_alphas=audio_only, input_budget=(100, 400),
                 target_budget=(2, 100))
    cfg = K.MaskingConfig(mixture=[scattered, plain], audio_spans=(1, 3))
    assert cfg.max_audio_spans == 128
    toks, b = run(cfg)
    enc, dec = check_structure(toks, b, cfg)
    pe, pd = per_modality(enc), per_modality(dec)
    a0 = M.POS_OFFSETS[AUDIO]
    fin = enc[:, a0:a0 + 512:2]
    is_scattered = pe[:, CAPTION] > 0
    assert 0.4 < is_scattered.float().mean() < 0.6
    # the scattered component: the whole caption and many input runs (64-128 spans, some merge where a gap
    # rounds to zero); every audio token not given is a target
    assert (runs(fin[is_scattered]) >= 20).all() and runs(fin[is_scattered]).float().mean() > 40
    assert (pe[is_scattered, AUDIO] + pd[is_scattered, AUDIO] == 512).all()
    # the plain component keeps at most 3 input spans
    assert (runs(fin[~is_scattered]) <= 3).all()
    with pytest.raises(ValueError, match="audio_spans"):
        K.MaskingConfig(mixture=[dict(weight=1.0, audio_spans=(0, 4))])
    with pytest.raises(ValueError, match="audio_spans"):
        K.MaskingConfig(audio_spans=(1, 300))


def test_single_source_mixture_full_modalities():
    cfg = K.MaskingConfig(mixture=K.single_source_mixture(sources=("caption", "rgb"), target="audio", weight=0.4))
    assert cfg.max_target_tokens == 512 and cfg.max_input_tokens == 256
    toks, b = run(cfg)
    enc, dec = check_structure(toks, b, cfg)
    pe, pd = per_modality(enc), per_modality(dec)
    cap_n = M.caption_valid(toks["caption"]).sum(1)
    whole_audio = (pd[:, AUDIO] == 512) & (pd.sum(1) == 512)
    only_caption = (pe[:, CAPTION] == cap_n) & (pe.sum(1) == cap_n)
    only_rgb = (pe[:, 0] == 196) & (pe.sum(1) == 196)
    single = only_caption | only_rgb
    assert torch.equal(whole_audio, single)
    frac_c, frac_r = only_caption.float().mean(), only_rgb.float().mean()
    assert abs(frac_c - 0.2) < 0.04 and abs(frac_r - 0.2) < 0.04, (frac_c, frac_r)
    # the other 60% follow the plain recipe (budgets <= 256, several modalities)
    assert (pd[~single].sum(1) <= 256).all() and (pe[~single] > 0).sum(1).float().mean() > 3


def test_full_inputs_add_to_budget():
    cfg = K.MaskingConfig(input_full=("depth",), input_budget=(10, 10), target_full="caption",
                          target_budget=(0, 0), target_alphas=(0,) * 5)
    assert cfg.max_input_tokens == 10 + 196 and cfg.max_target_tokens == 16
    toks, b = run(cfg, B=300)
    enc, dec = check_structure(toks, b, cfg)
    pe, pd = per_modality(enc), per_modality(dec)
    assert (pe[:, 1] == 196).all() and (pe.sum(1) == 206).all()
    assert (pe[:, CAPTION] + pd[:, CAPTION] == M.caption_valid(toks["caption"]).sum(1)).all()
    assert (pd.sum(1) == pd[:, CAPTION]).all()


def test_min_input_tokens():
    cfg = K.MaskingConfig(input_budget=(0, 3), min_input_tokens=5)
    toks, b = run(cfg, B=500)
    assert (check_structure(toks, b, cfg)[0].sum(1) >= 5).all()
    # audio-only inputs with a 0-1 token budget: rounding to frames must not leave the encoder empty
    cfg = K.MaskingConfig(input_budget=(0, 1), input_alphas=(0, 0, 0, 1, 0))
    toks, b = run(cfg, B=500)
    enc, _ = check_structure(toks, b, cfg)
    assert (enc.sum(1) == 2).all() and cfg.max_input_tokens == 2


def test_budgets_exceeding_available():
    # inputs take 600 of ~1100 available tokens (clamped shares get redistributed), targets all the rest
    cfg = K.MaskingConfig(input_budget=(600, 600), target_budget=(1116, 1116))
    toks, b = run(cfg, B=500)
    enc, dec = check_structure(toks, b, cfg)
    n_valid = valid_all(toks).sum(1)
    # exact, except when only audio has room left and its share is odd: the frame rounds down (599)
    assert (enc.sum(1) >= 599).all() and (enc.sum(1) == 600).float().mean() > 0.95
    assert torch.equal(enc.sum(1) + dec.sum(1), n_valid)
    # everything as input, nothing left for targets
    cfg = K.MaskingConfig(input_budget=(2000, 2000), target_budget=(16, 256))
    toks, b = run(cfg, B=200)
    enc, dec = check_structure(toks, b, cfg)
    assert torch.equal(enc.sum(1), n_valid[:200] * 0 + valid_all(toks).sum(1)) and dec.sum() == 0
    # one tiny modality asked for everything: caption-only inputs give at most its valid tokens
    cfg = K.MaskingConfig(input_alphas=(0, 0, 0, 0, 1), input_budget=(16, 16))
    toks, b = run(cfg, B=200)
    enc, dec = check_structure(toks, b, cfg)
    assert torch.equal(enc.sum(1), M.caption_valid(toks["caption"]).sum(1))


def test_reproducible_with_seed():
    cfg = K.MaskingConfig(mixture=K.single_source_mixture())
    _, a = run(cfg, B=64, seed=3)
    _, b = run(cfg, B=64, seed=3)
    _, c = run(cfg, B=64, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["enc_pos"], c["enc_pos"])


def test_bad_config_and_input_refused():
    with pytest.raises(ValueError, match="unknown key"):
        K.MaskingConfig(mixture=[dict(weight=1.0, input_alpha=(1,) * 5)])
    with pytest.raises(ValueError, match="no inputs possible"):
        K.MaskingConfig(input_alphas=(0,) * 5)
    with pytest.raises(ValueError, match="input_alphas"):
        K.MaskingConfig(input_alphas=(1, 1, 1))
    with pytest.raises(ValueError, match="unknown modality"):
        K.MaskingConfig(target_full=("sound",))
    with pytest.raises(ValueError, match="both"):
        K.MaskingConfig(input_full=("rgb",), target_full=("tok_rgb",))
    toks = K.random_tokens(4)
    toks["tok_audio"] = toks["tok_audio"][:, :100]
    with pytest.raises(ValueError, match="tok_audio"):
        K.build_batch(toks, K.MaskingConfig())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_and_eager_agree_without_sync():
    cfg = K.MaskingConfig(mixture=K.single_source_mixture())
    toks = K.random_tokens(512, "cuda", torch.Generator(device="cuda").manual_seed(0))
    out = {}
    for graph in (True, False):
        K.build_batch(toks, cfg, torch.Generator(device="cuda").manual_seed(1), cuda_graph=graph)  # capture / warm up
        # no host-device synchronization inside build_batch (it must only queue work on the GPU)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out[graph] = K.build_batch(toks, cfg, torch.Generator(device="cuda").manual_seed(2), cuda_graph=graph)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out[True]["enc_ids"].is_cuda
    assert all(torch.equal(out[True][k], out[False][k]) for k in out[True])
    # the graph's static outputs are copied: a later call does not change an earlier batch
    before = {k: v.clone() for k, v in out[True].items()}
    K.build_batch(toks, cfg, torch.Generator(device="cuda").manual_seed(3))
    assert all(torch.equal(before[k], out[True][k]) for k in before)
    check_structure({k: v.cpu() for k, v in toks.items()}, {k: v.cpu() for k, v in out[True].items()}, cfg)


def test_mixture_per_batch_gives_one_component_per_batch():
    mix = K.single_source_mixture(sources=("caption", "rgb"), target="audio", weight=0.5)
    per_sample = K.MaskingConfig(mixture=mix)
    per_batch = K.MaskingConfig(mixture=mix, mixture_per_batch=True)
    _, b = run(per_sample, B=64)
    whole_audio = per_modality(chosen_masks(b, "dec"))[:, AUDIO] == 512
    assert 0 < whole_audio.sum() < 64                      # 4M: components mix inside a batch
    kinds = set()
    for seed in range(12):
        toks, b = run(per_batch, B=64, seed=seed)
        check_structure(toks, b, per_batch)
        whole_audio = per_modality(chosen_masks(b, "dec"))[:, AUDIO] == 512
        assert whole_audio.all() or not whole_audio.any()  # one component for the whole batch
        kinds.add(bool(whole_audio[0]))
    assert kinds == {True, False}                          # ... and still both kinds across batches


def test_caption_query_set_does_not_reveal_its_length():
    """A whole-caption target is all 16 positions whatever the text's length, so the decoder's queries cannot
    tell "a photo of a coyote" (6 BPE ids) from "a photo of a cat" (5)."""
    none = (0.0,) * 5
    cfg = K.MaskingConfig(mixture=[dict(weight=1.0, input_full=("audio",), input_alphas=none, input_budget=(0, 0),
                                        target_full=("caption",), target_alphas=none, target_budget=(0, 0))])
    toks = K.random_tokens(2, generator=torch.Generator().manual_seed(0))
    toks["caption"][0] = torch.from_numpy(S.encode_caption(S.caption_text("coyote")))
    toks["caption"][1] = torch.from_numpy(S.encode_caption(S.caption_text("cat")))
    b = K.build_batch(toks, cfg, torch.Generator().manual_seed(1))
    assert b["dec_valid"].sum(1).tolist() == [M.CAPTION_LEN, M.CAPTION_LEN]
    assert torch.equal(b["dec_pos"][0], b["dec_pos"][1])
    # ... but the loss scores only the text and its first end-of-text: the padding after it is queried with
    # IGNORE_ID as its target (coyote: 6 ids + 1 end-of-text scored; cat: 5 + 1)
    cap_ids = b["dec_ids"][:, -M.CAPTION_LEN:]
    assert (cap_ids >= 0).sum(1).tolist() == [7, 6]
    assert cap_ids[0, 6] == M.CAPTION_PAD and (cap_ids[0, 7:] == M.IGNORE_ID).all()
    assert cap_ids[1, 5] == M.CAPTION_PAD and (cap_ids[1, 6:] == M.IGNORE_ID).all()
    assert (b["enc_ids"] >= 0).all()                        # inputs keep their padding ids
    np_mask = M.caption_scored(toks["caption"].numpy())     # numpy and torch agree
    assert np.array_equal(np_mask, M.caption_scored(toks["caption"]).numpy())


def test_toyzoo_config_whole_targets_with_a_side_budget():
    """config/toyzoo.py's components: a whole input, a whole target, plus exactly 32 tokens of one more
    modality as targets (audio -> caption + 32 rgb; rgb -> caption, depth or normal + 32 audio in whole frames)."""
    import runpy
    c = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config",
                                    "toyzoo.py"))
    c = c["masking"]                                            # (per sample here: mixture_per_batch left out)
    cfg = K.MaskingConfig(input_budget=c["input_budget"], target_budget=c["target_budget"], mixture=c["mixture"])
    toks, b = run(cfg, B=1000)
    enc, dec = check_structure(toks, b, cfg)
    pe, pd = per_modality(enc), per_modality(dec)
    cap_n = M.caption_valid(toks["caption"]).sum(1)
    from_audio = (pe[:, AUDIO] == 512) & (pe.sum(1) == 512)
    assert (pd[from_audio, CAPTION] == cap_n[from_audio]).all() and (pd[from_audio, 0] == 32).all()
    assert (pd[from_audio].sum(1) == cap_n[from_audio] + 32).all()
    from_rgb = (pe[:, 0] == 196) & (pe.sum(1) == 196)
    to_caption = from_rgb & (pd[:, CAPTION] > 0)
    whole = from_rgb & ((pd[:, 1] == 196) | (pd[:, 2] == 196))
    assert (to_caption | whole)[from_rgb].all() and (pd[from_rgb, AUDIO] == 32).all()
    assert (pd[to_caption, CAPTION] == cap_n[to_caption]).all()
    assert (pd[whole].sum(1) == 196 + 32).all() and (pd[to_caption].sum(1) == cap_n[to_caption] + 32).all()
    w = [comp["weight"] / sum(x["weight"] for x in c["mixture"]) for comp in c["mixture"]]   # the config's shares
    for frac, want in ((from_audio, w[1]), (to_caption, w[2]), (whole, w[4] + w[5])):
        assert abs(frac.float().mean() - want) < 0.05


def test_shift_grids_moves_every_image_grid_by_one_offset():
    B, G = 64, M.GRID
    tokens = {m.name: torch.randint(m.vocab, (B, m.length)) for m in M.MODALITIES}
    out = M.shift_grids(tokens, 2, torch.Generator().manual_seed(0))
    seen = set()
    for b in range(B):
        grids = {m.name: (tokens[m.name][b].view(G, G), out[m.name][b].view(G, G)) for m in M.MODALITIES if m.layout == "grid"}
        # recover the offset from rgb: the unique (dy, dx) whose interior matches, then check every grid has it
        src, dst = grids["tok_rgb"]
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(dst[max(dy, 0):G + min(dy, 0), max(dx, 0):G + min(dx, 0)],
                                src[max(-dy, 0):G - max(dy, 0), max(-dx, 0):G - max(dx, 0)])]
        assert len(found) == 1
        dy, dx = found[0]
        seen.add((dy, dx))
        for src, dst in grids.values():
            rows = (torch.arange(G) - dy).clamp(0, G - 1)
            cols = (torch.arange(G) - dx).clamp(0, G - 1)
            assert torch.equal(dst, src[rows][:, cols])    # moved, with the border patches repeated
    assert len(seen) > 10                                  # offsets vary across the batch
    for m in M.MODALITIES:                                 # audio and caption untouched
        if m.layout != "grid":
            assert torch.equal(out[m.name], tokens[m.name])
    same = M.shift_grids(tokens, 0)
    assert all(torch.equal(same[k], tokens[k]) for k in tokens)
