"""The five tokenizers: id ranges, exact round trips where they exist, reconstruction quality of the
offline ones against a baseline, and EnCodec's real code path on an untrained model of its architecture."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import modalities as M  # noqa: E402
import streams as S  # noqa: E402
import modality_tokenizers as T  # noqa: E402

SR = M.AUDIO_SR


def synth(f0, seed, n=M.AUDIO_WINDOW):
    """A harmonic call with vibrato, a pulsing envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    phase = 2 * np.pi * f0 * (t + 0.02 * np.sin(2 * np.pi * 3 * t) / (2 * np.pi * 3))
    x = sum(0.3 / (k + 1) * np.sin((k + 1) * phase) for k in range(6))
    env = 0.2 + 0.8 * (np.sin(2 * np.pi * (1 + rng.random()) * t) > 0)
    return (x * env + 0.01 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def waves():
    return np.stack([synth(f0, i) for i, f0 in enumerate([180, 260, 410, 700])])


@pytest.fixture(scope="module")
def mel_tok(waves):
    f = T.log_mel(torch.from_numpy(waves))
    keys = T.MelRVQTokenizer.level1_input(f, "shape_delta")          # on whole windows, then flattened
    return T.MelRVQTokenizer.fit(f.reshape(-1, T.N_MELS), keys=keys.reshape(-1, keys.shape[-1]), codes=128,
                                 iters=8, seed=0, level1="shape_delta", griffin_lim_iters=24)


def test_interleave_round_trip():
    codes = torch.randint(0, 1024, (3, 7, 2, 256))
    seq = S.interleave_audio(codes)
    assert seq.shape == (3, 7, 512) and seq.max() < 2048
    assert (seq[..., 0::2] == codes[..., 0, :]).all() and (seq[..., 1::2] == codes[..., 1, :] + 1024).all()
    assert torch.equal(S.deinterleave_audio(seq), codes)
    assert np.array_equal(S.deinterleave_audio(S.interleave_audio(codes.numpy())), codes.numpy())


def test_log_mel_geometry():
    f = T.log_mel(torch.zeros(2, M.AUDIO_WINDOW))
    assert f.shape == (2, 256, 80)        # exactly 256 frames at 75 Hz for 81,920 samples
    assert T.log_mel(torch.zeros(M.AUDIO_WINDOW * 2)).shape == (512, 80)


def test_mel_rvq_ids_and_reconstruction(mel_tok, waves):
    ids = mel_tok.encode(waves)
    assert ids.shape == (4, 512) and ids.dtype == torch.long
    assert ids[:, 0::2].min() >= 0 and ids[:, 0::2].max() < 128          # level 1 in [0, 1024)
    assert ids[:, 1::2].min() >= 1024 and ids[:, 1::2].max() < 1024 + 128  # level 2 offset by 1024
    rec = torch.from_numpy(mel_tok.decode(ids))
    assert rec.shape == (4, M.AUDIO_WINDOW) and rec.dtype == torch.float32
    x = torch.from_numpy(waves)
    d_rec = T.spectral_distance(rec, x)
    d_other = T.spectral_distance(x.roll(1, 0), x)                     # another clip as the baseline
    print(f"\nmel_rvq log-mel L1 to input: reconstruction {d_rec.mean():.3f}, other clip {d_other.mean():.3f}")
    assert (d_rec < 0.5 * d_other).all()
    # a second level helps: the residual codebook lowers the error of level 1 alone
    assert mel_tok.settings["mse_level2"] < 0.8 * mel_tok.settings["mse_level1"]
    # code features: each id's codebook vector (their sum over a frame's two ids is what decoding inverts);
    # the ids past the 128-entry codebooks are zero rows
    feats = mel_tok.id_features()
    assert feats.shape == (2048, T.N_MELS)
    torch.testing.assert_close(feats[ids[:, 0::2]] + feats[ids[:, 1::2]],
                               mel_tok.codes_to_features(S.deinterleave_audio(ids)))
    assert feats[128:1024].abs().sum() == 0 and feats[1024 + 128:].abs().sum() == 0


def test_mel_rvq_one_level(waves, tmp_path):
    """levels=1: one id a frame over the whole spectrum (layout K = 1, a 256-id stream in [0, 1024)); its ids
    are level 1 of the two-level fit on the same frames, decoding sums one vector, and it saves and loads as
    itself. A one-level codebook of the shape alone (no loudness) is refused."""
    f = T.log_mel(torch.from_numpy(waves)).reshape(-1, T.N_MELS)
    one = T.MelRVQTokenizer.fit(f, codes=64, iters=4, seed=0, level1="spectrum", levels=1)
    two = T.MelRVQTokenizer.fit(f, codes=64, iters=4, seed=0, level1="spectrum")
    assert one.codebooks.shape == (1, 64, T.N_MELS) and one.layout == M.AudioLayout(codebooks=1)
    assert two.layout == M.ENCODEC_LAYOUT and torch.equal(one.codebooks[0], two.codebooks[0])
    ids = one.encode(waves)
    assert ids.shape == (4, 256) and 0 <= ids.min() and ids.max() < 64
    assert torch.equal(ids, S.deinterleave_audio(two.encode(waves), two.layout)[:, 0])   # level 1 of the two
    assert torch.equal(one.codes_to_features(ids[:, None]), one.codebooks[0][ids])
    assert one.decode(ids).shape == (4, M.AUDIO_WINDOW)
    assert one.id_features().shape == (1024, T.N_MELS) and one.settings["mse_level2"] == one.settings["mse_level1"]
    one.save(str(tmp_path / "a.pt"))
    back = T.MelRVQTokenizer.load(str(tmp_path / "a.pt"))
    assert back.layout == one.layout and torch.equal(back.encode(waves), ids)
    with pytest.raises(ValueError, match="spectrum"):
        T.MelRVQTokenizer.fit(f, codes=8, iters=1, level1="shape", levels=1)


def test_mel_rvq_exact_parts(mel_tok, waves, tmp_path):
    c1 = mel_tok.codebooks[0]
    assert mel_tok.settings["level1"] == "shape_delta" and mel_tok.keys.shape == (128, 160)
    # a code's decoding vector is the shape half of its key (the frame shape, not its change)
    assert torch.equal(mel_tok.keys[:, :80], c1)
    f = T.log_mel(torch.from_numpy(waves))                             # [4, 256, 80], windows in time order
    # level 1 codes the spectral shape and its change: a window 3 nats louder everywhere keeps its codes
    assert torch.equal(mel_tok.level1(f + 3.0), mel_tok.level1(f))
    # the change looks back DELTA_LAG frames within the window only (frames before that look back to the
    # window's first), so a window coded alone or in a batch gets the same codes
    keys = T.MelRVQTokenizer.level1_input(f, "shape_delta")
    s = f - f.mean(-1, keepdim=True)
    assert keys.shape == (4, 256, 160) and torch.equal(keys[..., :80], s) and keys[:, 0, 80:].abs().max() == 0
    assert torch.allclose(keys[:, 1, 80:], s[:, 1] - s[:, 0])
    assert torch.allclose(keys[:, 5, 80:], s[:, 5] - s[:, 5 - T.MelRVQTokenizer.DELTA_LAG])
    assert torch.equal(mel_tok.level1(f[2]), mel_tok.level1(f)[2])
    # what the change adds: a frame's code depends on what came before it, not on the frame alone
    swapped = f.clone()
    swapped[:, :100] = f[:, :100].flip(1)                              # the same frames, earlier ones reversed
    assert not torch.equal(mel_tok.level1(swapped)[:, 2:98], mel_tok.level1(f)[:, :100].flip(1)[:, 2:98])
    # shape_delta needs its keys: fitting without them or loading a codebook without them is refused
    with pytest.raises(ValueError, match="keys"):
        T.MelRVQTokenizer.fit(f.reshape(-1, 80), codes=8, iters=1, level1="shape_delta")
    with pytest.raises(ValueError, match="keys"):
        T.MelRVQTokenizer(mel_tok.codebooks, mel_tok.settings)
    # codebooks of the earlier modes still load and code as they were fitted
    shape = T.MelRVQTokenizer(mel_tok.codebooks, {**mel_tok.settings, "level1": "shape"})
    assert torch.equal(shape.level1(f), T.nearest(s.reshape(-1, 80), c1).view(4, 256))
    old = T.MelRVQTokenizer(mel_tok.codebooks, {k: v for k, v in mel_tok.settings.items() if k != "level1"})
    assert old.level1_mode == "spectrum" and torch.equal(old.level1(f), T.nearest(f.reshape(-1, 80), c1).view(4, 256))
    codes = mel_tok.codes(waves)
    feats = mel_tok.codes_to_features(codes)
    # decoding to features and re-quantising gives the same level-1 codes for almost every frame
    # (not all: RVQ's greedy search need not map c1[i] + c2[j] back to i), and identical features
    again = mel_tok.codes_to_features(torch.stack([mel_tok.level1(feats), codes[:, 1]], 1))
    agree = (mel_tok.level1(feats) == codes[:, 0]).float().mean().item()
    print(f"\nmel_rvq level-1 re-quantisation agreement {agree:.3f}")
    assert agree > 0.9 and again.shape == feats.shape
    path = str(tmp_path / "a.pt")
    mel_tok.save(path)
    assert torch.equal(T.MelRVQTokenizer.load(path).encode(waves), mel_tok.encode(waves))
    assert torch.equal(S.interleave_audio(codes), mel_tok.encode(waves))


def images(modality, n=6, seed=0):
    rng = np.random.default_rng(seed)
    if modality == "tok_depth":
        out = np.full((n, 224, 224), 20000, np.uint16)
        yy = np.arange(224)[:, None]
        out += (yy * 40).astype(np.uint16)                               # a floor receding upwards
    else:
        out = np.zeros((n, 224, 224, 3), np.uint8)
        out[:] = rng.integers(40, 200, (n, 1, 1, 3))
    for i in range(n):
        for _ in range(3):
            y, x, s = rng.integers(0, 170), rng.integers(0, 170), rng.integers(20, 54)
            if modality == "tok_depth":
                out[i, y:y + s, x:x + s] = rng.integers(3000, 15000)
            else:
                out[i, y:y + s, x:x + s] = rng.integers(0, 255, 3)
    return out


@pytest.mark.parametrize("modality,means,shapes", [("tok_rgb", 8, 32), ("tok_depth", 4, 16),
                                                  ("tok_normal", 8, 16)])
def test_patch_kmeans(modality, means, shapes, tmp_path):
    train, test = images(modality, seed=1), images(modality, n=3, seed=2)
    v, _ = T.PatchKMeansTokenizer.helper(modality).patch_vectors(train)
    tok = T.PatchKMeansTokenizer.fit(modality, v.reshape(-1, v.shape[-1]), means, shapes, iters=8, seed=0)
    ids = tok.encode(test)
    assert ids.shape == (3, 196) and ids.min() >= 0 and ids.max() < means * shapes
    # reconstruction error of the coded patches vs. a random code per patch
    vt, _ = tok.patch_vectors(test)
    vt = vt.reshape(-1, vt.shape[-1])
    err = ((tok.vectors_from_ids(ids.flatten()) - vt) ** 2).sum(1).mean().item()
    rand = torch.randint(0, means * shapes, (len(vt),), generator=torch.Generator().manual_seed(0))
    err_rand = ((tok.vectors_from_ids(rand) - vt) ** 2).sum(1).mean().item()
    print(f"\n{modality}: patch mse {err:.4f} vs random code {err_rand:.4f}")
    assert err < 0.2 * err_rand
    dec = tok.decode(ids)
    assert dec.shape == ((3, 224, 224) if modality == "tok_depth" else (3, 224, 224, 3))
    assert dec.dtype == (np.uint16 if modality == "tok_depth" else np.uint8)
    # exact: every code's vector quantises back to that code
    every = torch.arange(means * shapes)
    assert torch.equal(tok.ids_from_vectors(tok.vectors_from_ids(every)), every)
    if modality != "tok_depth":   # depth is re-standardised per image, so only rgb/normals are pixel-exact
        assert torch.equal(tok.encode(dec), ids)
    # code features: row i is what id i decodes to (here: its patch vector, which quantises back to i)
    feats = tok.id_features()
    assert feats.shape == (means * shapes, v.shape[-1])
    assert torch.equal(tok.ids_from_vectors(feats), every)
    path = str(tmp_path / "c.pt")
    tok.save(path)
    assert torch.equal(T.PatchKMeansTokenizer.load(path).encode(test), ids)



def test_patch_kmeans_depth_norm_global():
    """depth_norm='global' codes log depth on one fixed scale (the train set's typical mean and std), so a map
    decodes at its own depth; the per-image default keeps only the shape, decoded at the typical scale."""
    rng = np.random.default_rng(0)

    def scene(level):   # a floor at `level`, an 80 px square twice as near
        d = np.full((224, 224), level, np.float64)
        y, x = rng.integers(0, 144, 2)
        d[y:y + 80, x:x + 80] = level / 2
        return d.astype(np.uint16)

    train = np.stack([scene(level) for level in rng.uniform(4000, 40000, 24)])
    logd = np.log1p(train.astype(np.float64))
    ref = (float(np.median(logd.mean((1, 2)))), float(np.median(logd.std((1, 2)))))
    test = np.stack([scene(5000), scene(40000)])
    decoded = {}
    for norm in T.PatchKMeansTokenizer.DEPTH_NORMS:
        helper = T.PatchKMeansTokenizer("tok_depth", torch.zeros(1, 1), torch.zeros(1, 1),
                                        dict(depth_norm=norm, depth_ref=ref))
        v, _ = helper.patch_vectors(train)
        tok = T.PatchKMeansTokenizer.fit("tok_depth", v.reshape(-1, v.shape[-1]), 16, 8, iters=8, seed=0,
                                         depth_ref=ref, depth_norm=norm)
        assert tok.depth_norm == norm
        decoded[norm] = np.median(tok.decode(tok.encode(test)).astype(np.float64), axis=(1, 2))   # the floors
    assert np.allclose(decoded["global"], [5000, 40000], rtol=0.15)
    assert decoded["image"][0] == pytest.approx(decoded["image"][1], rel=0.05)   # one scale for both maps
    with pytest.raises(ValueError, match="depth_norm"):
        T.PatchKMeansTokenizer("tok_depth", torch.zeros(1, 1), torch.zeros(1, 1), dict(depth_norm="per_patch"))

def test_caption():
    tok = T.CaptionTokenizer()
    ids = tok.encode(["a photo of a cow", "a photo of a pigeon"])
    assert ids.shape == (2, M.CAPTION_LEN) and ids.max() < M.VOCAB_SIZE
    assert tok.decode(ids) == ["a photo of a cow", "a photo of a pigeon"]


def test_encodec_untrained_code_path():
    from encodec import EncodecModel
    torch.manual_seed(0)
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.set_target_bandwidth(1.5)
    assert not model.quantizer.vq.layers[0]._codebook.inited.item()
    with torch.no_grad():
        # EnCodec's own init: k-means on the first > 1,024 frames its quantizer's forward sees; random
        # latents instead of encoder outputs and one Lloyd iteration keep the test cheap
        T.encodec_init_untrained(model, torch.randn(1, model.quantizer.dimension, 1040), kmeans_iters=1)
    assert model.quantizer.vq.layers[0]._codebook.inited.item()
    tok = T.EncodecTokenizer(model=model)
    x = synth(220, 0)[None]                                  # one 3.41 s window
    codes = tok.codes(x)
    assert codes.shape == (1, 2, 256) and codes.min() >= 0 and codes.max() < 1024
    ids = tok.encode(x)
    assert ids.shape == (1, 512) and ids.min() >= 0 and ids.max() < 2048
    assert torch.equal(S.deinterleave_audio(ids), codes)
    wave = tok.decode(ids)
    assert wave.shape == (1, M.AUDIO_WINDOW) and wave.dtype == np.float32
    # code features: audio id c + 1024 k is codebook k's vector c
    feats = tok.id_features()
    assert feats.shape == (2048, model.quantizer.dimension)
    for k in range(2):
        torch.testing.assert_close(feats[k * 1024:(k + 1) * 1024], model.quantizer.vq.layers[k].codebook)


def test_divae_absent_is_a_clear_error():
    try:
        import fourm  # noqa: F401
        pytest.skip("fourm is installed: the absent-package error cannot be shown")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install"):
        T.DivaeTokenizer("rgb")


def test_bad_audio_shape_refused(mel_tok):
    with pytest.raises(ValueError, match="81920"):
        mel_tok.encode(np.zeros((2, 1000), np.float32))


def test_divae_weights_are_pinned_to_the_commit_the_dataset_recorded(monkeypatch, tmp_path):
    """The DiVAE loader resolves the hub snapshot it loads to a commit, records it in the tokenizer's settings
    (tokenize_all.py writes it to meta.json), and load_tokenizer asks for exactly that commit again; a
    snapshot of another commit is refused. fourm and the hub are stand-ins here (the real ones: tests_extras)."""
    import sys
    import types
    import huggingface_hub
    import modality_tokenizers as T
    commits = {"main": "a" * 40, "b" * 40: "b" * 40}
    asked = []

    def snapshot_download(repo_id, revision=None):
        asked.append(revision)
        path = tmp_path / "snapshots" / commits.get(revision or "main", "c" * 40)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    class DiVAE(torch.nn.Module):
        @classmethod
        def from_pretrained(cls, path):
            assert os.path.isdir(path)     # the resolved snapshot, not the repo id
            return cls()

    fourm = types.ModuleType("fourm.vq.vqvae")
    fourm.DiVAE = DiVAE
    monkeypatch.setitem(sys.modules, "fourm.vq.vqvae", fourm)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    first = T.DivaeTokenizer("tok_depth", "cpu")
    assert first.settings["revision"] == "a" * 40 and asked == [None]
    meta = {"modalities": {"tok_depth": {"tokenizer": "divae", "revision": "b" * 40}}}
    again = T.load_tokenizer(str(tmp_path), meta, "tok_depth")
    assert asked[-1] == "b" * 40 and again.settings["revision"] == "b" * 40
    with pytest.raises(RuntimeError, match="asked for revision"):
        T.load_divae_model("tok_depth", "d" * 40)
