"""evaluate.py, metrics.py and audio_features.py: each probe on a fixture with a known answer, then an end-to-end
run on a tiny random checkpoint and a tiny tokenized dataset."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import audio_features as AF  # noqa: E402
import evaluate as E  # noqa: E402
import metrics  # noqa: E402
import modalities as M  # noqa: E402
import streams as S  # noqa: E402


# --- statistics

def test_wilson_ci_known_case():
    lo, hi = metrics.wilson_ci(50, 100)
    assert lo < 0.5 < hi
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3   # the textbook 95% Wilson interval
    lo0, hi0 = metrics.wilson_ci(0, 20)
    assert lo0 == 0.0 and 0.1 < hi0 < 0.2                        # never negative, not degenerate at p = 0
    w_small, w_big = np.subtract(*metrics.wilson_ci(5, 10)[::-1]), np.subtract(*metrics.wilson_ci(500, 1000)[::-1])
    assert w_big < w_small / 5                                    # shrinks like 1/sqrt(n)


def test_clustered_accuracy_and_mean_ci():
    correct = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    acc, lo, hi = metrics.clustered_accuracy(correct)
    assert acc == pytest.approx(6 / 12) and lo < acc < hi
    m, lo, hi = metrics.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo < 2.0 < hi


def test_marginal_entropy():
    V = 2048
    assert metrics.marginal_entropy(np.arange(V).repeat(3), V) == pytest.approx(math.log(V))
    assert metrics.marginal_entropy(np.zeros(100, dtype=np.int64), V) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 16, 100000)
    assert metrics.cross_entropy_to_marginal(ids, ids, 16) == pytest.approx(math.log(16), abs=0.01)


def test_entropy_bias_correction_covers_what_the_plug_in_underestimates():
    # 40 clips of 50 uniform ids over 512: the plug-in entropy falls short of log 512; the corrected
    # value's interval covers it
    V = 512
    truth = math.log(V)
    for seed in range(3):
        a = np.random.default_rng(seed).integers(0, V, (40, 50))
        h = metrics.marginal_entropy(a, V)
        corrected, lo, hi = metrics.entropy_bias_corrected(a, V, reps=100)
        assert h < truth and h < corrected and lo <= truth <= hi


def test_jackknife_ci_of_a_mean_is_the_normal_interval():
    x = np.random.default_rng(0).normal(size=30)
    point, lo, hi = metrics.jackknife_ci(lambda i: x[i].mean(), len(x))
    m, m_lo, m_hi = metrics.mean_ci(x)
    assert point == pytest.approx(m) and lo == pytest.approx(m_lo) and hi == pytest.approx(m_hi)


def test_ratio_ci_is_centred_on_the_token_weighted_mean():
    sums, counts = np.array([10.0, 1.0, 30.0, 2.0]), np.array([2, 1, 10, 1])   # per-row means 5, 1, 3, 2
    r, lo, hi = metrics.ratio_ci(sums, counts)
    assert r == pytest.approx(43 / 14) and lo < r < hi
    r, lo, hi = metrics.ratio_ci(np.array([6.0, 9.0]), np.array([2, 3]))          # every row's mean is 3
    assert r == pytest.approx(3.0) and lo == pytest.approx(3.0) and hi == pytest.approx(3.0)


# --- ranking with fair ties

def test_classification_perfect_and_constant_scorer():
    rng = np.random.default_rng(0)
    C, N = 11, 330
    labels = np.arange(N) % C
    perfect = rng.normal(size=(N, C))
    perfect[np.arange(N), labels] = 100.0
    out = metrics.classification_metrics(perfect, labels, [f"c{i}" for i in range(C)])
    assert out["top1"]["value"] == 1.0 and out["top5"]["value"] == 1.0
    assert np.trace(np.array(out["confusion"])) == N
    assert all(v["x_chance"] == pytest.approx(C) for v in out["per_class"].values())
    const = np.zeros((N, C))
    out = metrics.classification_metrics(const, labels, [f"c{i}" for i in range(C)])
    assert out["top1"]["value"] == pytest.approx(1 / C)          # exactly chance, never a lucky tie-break
    assert out["top5"]["value"] == pytest.approx(5 / C)
    assert out["top1"]["ci"][0] < 1 / C < out["top1"]["ci"][1]
    assert np.array(out["confusion"]).sum() == N


def test_constant_scorer_does_not_win_by_tie_order():
    # answer always at index 0 (where a naive argmax tie-break would land)
    hits = metrics.fair_hits(np.zeros((10, 4)), np.zeros(10, dtype=np.int64), [1, 2, 4])
    assert np.allclose(hits.mean(0), [0.25, 0.5, 1.0])


def test_retrieval_perfect_and_constant():
    G = 20
    s = -np.abs(np.arange(G)[:, None] - np.arange(G)[None, :]).astype(float)   # best on the diagonal
    r = metrics.retrieval_metrics(s)
    assert r["R@1"]["value"] == 1.0 and r["R@5"]["value"] == 1.0
    r = metrics.retrieval_metrics(np.ones((G, G)))
    assert r["R@1"]["value"] == pytest.approx(1 / G) and r["R@5"]["value"] == pytest.approx(5 / G)
    assert r["curve"][-1] == pytest.approx(1.0) and len(r["curve"]) == G


def test_class_level_retrieval_known_answers():
    labels = np.repeat(np.arange(4), 5)                      # 4 classes x 5 clips, gallery 20
    same = (labels[:, None] == labels[None, :]).astype(float)
    c = metrics.class_level_retrieval(same, labels)                # knows the class, nothing else
    assert c["top1_same_class"]["value"] == 1.0
    assert c["top1_same_class"]["chance"] == pytest.approx(5 / 20)
    assert c["class_only_ceiling"]["R@1"] == pytest.approx(1 / 5) and c["class_only_ceiling"]["R@5"] == 1.0
    assert metrics.retrieval_metrics(same)["R@1"]["value"] == pytest.approx(1 / 5)    # ... which is that ceiling
    assert c["class_effect"] == pytest.approx(1.0) and c["clip_effect"] == pytest.approx(0.0)
    c = metrics.class_level_retrieval(np.ones((20, 20)), labels)  # knows nothing
    assert c["top1_same_class"]["value"] == pytest.approx(5 / 20)
    assert c["class_effect"] == pytest.approx(0.0) and c["other_class_sd"] == pytest.approx(0.0)
    c = metrics.class_level_retrieval(np.eye(20) * 3.0, labels)   # knows the very clip, not its class
    assert c["clip_effect"] > 2.0 and c["class_effect"] < 0.5


def test_class_pivot_known_answers():
    labels = np.repeat(np.arange(4), 5)                      # 4 classes x 5 clips, gallery 20
    sure = np.where(np.eye(4)[labels] > 0, 0.0, -30.0)       # each side names the class with certainty
    piv = metrics.class_pivot_scores(sure, sure)
    same = labels[:, None] == labels[None, :]
    assert np.allclose(piv[same], np.log(4)) and (piv[~same] < -20).all()   # PMI log C when they agree
    assert metrics.retrieval_metrics(piv)["R@5"]["value"] == pytest.approx(1.0)   # = the class-only ceiling
    assert np.allclose(metrics.class_pivot_scores(np.zeros((20, 4)), sure), 0.0)  # one side knows nothing: no
    assert metrics.retrieval_metrics(metrics.class_pivot_scores(np.zeros((20, 4)), sure))["R@1"]["value"] == \
        pytest.approx(1 / 20)                                               # information, chance


def test_fuse_scores_standardises_each_query():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    cls = (labels[:, None] == labels[None, :]).astype(float)                   # knows the class only
    clip = np.eye(20) + 0.01 * rng.standard_normal((20, 20))                   # knows the clip, weakly
    assert metrics.retrieval_metrics(cls)["R@1"]["value"] == pytest.approx(1 / 5)
    fused = metrics.fuse_scores(cls * 100.0, clip)           # the scale of either score does not matter
    assert metrics.retrieval_metrics(fused)["R@1"]["value"] == 1.0
    assert np.allclose(metrics.fuse_scores(3.0 * clip + 7.0), metrics.fuse_scores(clip))
    no_spread = np.ones((5, 5))
    assert np.allclose(metrics.fuse_scores(no_spread, clip[:5, :5]), metrics.fuse_scores(clip[:5, :5]))


def test_token_judge_known_answers():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    ids = rng.integers(0, 16, (40, 32)) + 16 * y[:, None]     # each class draws from its own 16 ids
    judge = metrics.fit_token_judge(ids, y, 4, 64)
    test = rng.integers(0, 16, (8, 32)) + 16 * np.repeat(np.arange(4), 2)[:, None]
    assert (judge(test) == np.repeat(np.arange(4), 2)).all()
    h = metrics.token_histograms(ids, 64)
    assert h.shape == (40, 64) and np.allclose(h.sum(1), 1.0)


def test_grid_reader_reads_a_planted_class_and_leaves_the_rng_alone():
    # each picture: random background ids 0..31 and a 2x2 patch of id 32 + class somewhere on the grid
    rng = np.random.default_rng(0)
    def pictures(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 32, (n, 14, 14))
        for i, (r, c) in enumerate(rng.integers(0, 13, (n, 2))):
            x[i, r:r + 2, c:c + 2] = 32 + y[i]
        return x.reshape(n, 196), y
    xtr, ytr = pictures(384)
    xte, yte = pictures(96)
    features = torch.from_numpy(rng.normal(size=(35, 8))).float()    # ids past the table read zeros
    for feats in (None, features):
        state = torch.get_rng_state()
        read = metrics.fit_grid_reader(xtr, ytr, 3, 64, feats, epochs=12, width=32, lr=3e-3, seed=0)
        assert torch.equal(state, torch.get_rng_state())
        lp = read(xte)
        assert lp.shape == (96, 3) and np.allclose(np.exp(lp).sum(1), 1, atol=1e-5)
        assert (lp.argmax(1) == yte).mean() > 0.9         # chance is 1/3
    # reproducible from its seed
    again = metrics.fit_grid_reader(xtr, ytr, 3, 64, features, epochs=12, width=32, lr=3e-3, seed=0)
    assert np.array_equal(lp, again(xte))


def test_clip_order_round_robin_over_classes():
    # rows stored out of order; sorted by clip id the classes come in blocks, as a split on disk does
    ids = ["b_2", "a_1", "c_1", "a_0", "b_0", "a_2", "b_1", "c_0"]
    labels = [1, 0, 2, 0, 1, 0, 1, 2]
    order = metrics.clip_order({"clip_ids": ids, "label": np.array(labels)})
    assert [ids[i] for i in order] == ["a_0", "b_0", "c_0", "a_1", "b_1", "c_1", "a_2", "b_2"]
    assert sorted(order.tolist()) == list(range(len(ids)))   # a permutation: every clip once
    # so any prefix (a --num_clips subset, the retrieval gallery) holds the classes evenly
    assert sorted(np.array(labels)[order[:6]].tolist()) == [0, 0, 1, 1, 2, 2]


# --- caption hypotheses: exact tokenized caption, no substring matching

def test_pig_and_pigeon_are_distinct_hypotheses():
    hyps = metrics.caption_hypotheses(["pig", "pigeon"])
    assert not np.array_equal(hyps[0], hyps[1])
    # each is the caption training scores: the text, its end-of-text, then unscored positions
    for h, name in zip(hyps, ["pig", "pigeon"]):
        full = S.encode_caption(f"a photo of a {name}")
        n = int((h >= 0).sum())
        assert len(h) == M.CAPTION_LEN and h[n - 1] == M.CAPTION_PAD and (h[n:] == M.IGNORE_ID).all()
        assert np.array_equal(h[:n], full[:n]) and (full[n:] == M.CAPTION_PAD).all()
    V = M.VOCAB_SIZE

    def fake_scorer(favoured):
        """log-probs that put all mass on the favoured class's exact caption; 2 samples."""
        target = metrics.caption_hypotheses([favoured])[0]

        def score_fn(length, hyp_ids):
            logp = np.full((length, V), -20.0)
            for p in range(min(length, len(target))):
                logp[p, target[p]] = 0.0
            return np.stack([logp[np.arange(length), h][h >= 0].sum() for h in hyp_ids])[None].repeat(2, 0)
        return score_fn

    for i, name in enumerate(["pig", "pigeon"]):
        s = metrics.caption_class_scores(fake_scorer(name), ["pig", "pigeon"])
        assert s.shape == (2, 2) and (s.argmax(1) == i).all(), (name, s)
    with pytest.raises(ValueError):
        metrics.caption_hypotheses(["pig", "pig"])


# --- audio features

def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8))
    assert AF.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    d1 = AF.frechet_distance(a, a + 1.0)
    d2 = AF.frechet_distance(a, a + 2.0)
    assert d1 == pytest.approx(8.0, rel=1e-6) and d2 == pytest.approx(32.0, rel=1e-6)   # ||mu shift||^2
    # a rank-deficient covariance (fewer samples than dims) stays finite and non-negative
    assert np.isfinite(AF.frechet_distance(a[:5], a[5:10] * 2)) and AF.frechet_distance(a[:5], a[:5]) < 1e-6


def test_paired_fad_is_zero_for_one_set_and_grows_with_a_shift():
    """FAD between clip embeddings with a jackknife interval: 0 for a set against itself, a real-vs-real
    value whose interval holds a same-distribution draw, and a shifted set far above both (the squared
    shift, 4 dims x 2^2 = 16); unequal sides are refused."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 4)), rng.normal(size=(60, 4))
    assert metrics.paired_fad(a, a)[0] == pytest.approx(0.0, abs=1e-9)
    same, lo, hi, n = metrics.paired_fad(a, b)
    assert n == 60 and lo <= same <= hi and same < 1.0
    far, flo, fhi, _ = metrics.paired_fad(a, b + 2.0)
    assert flo > hi and abs(far - 16.0) < 3.0
    with pytest.raises(ValueError, match="as many rows"):
        metrics.paired_fad(a, b[:10])
    assert metrics.matched_rows(np.array([0, 1, 1]), np.array([1, 0, 1, 1])).tolist() == [1, 0, 2]
    assert metrics.matched_rows(np.array([2]), np.array([0, 1])) is None


def test_audio_features_and_classifier():
    rng = np.random.default_rng(0)
    t = np.arange(M.AUDIO_WINDOW) / M.AUDIO_SR
    waves, y = [], []
    for c, f in enumerate([300.0, 1200.0, 4000.0]):
        for _ in range(6):
            waves.append(0.3 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) + 0.01 * rng.normal(size=t.size))
            y.append(c)
    waves, y = np.array(waves, dtype=np.float32), np.array(y)
    frames = AF.log_mel_frames(waves)
    assert frames.shape == (18, M.AUDIO_WINDOW // AF.HOP + 1, AF.N_MELS)
    emb = AF.clip_embedding(frames=frames)
    assert emb.shape == (18, 2 * AF.N_MELS)
    clf = AF.fit_logreg(emb[::2], y[::2], 3)
    assert (AF.predict_proba(clf, emb[1::2]).argmax(1) == y[1::2]).all()
    # energy spread: a constant tone has ~none, a burst has a lot
    burst = waves[:1].copy()
    burst[:, : M.AUDIO_WINDOW // 2] = 0
    assert AF.energy_spread(burst)[0] > 10 * AF.energy_spread(waves[:1])[0]
    assert AF.mean_pairwise_distance(np.zeros((4, 3))) == 0.0


# --- the structure judge: a planted answer that only the order of the frames carries

def _chirps(rising, rate, seed, n=M.AUDIO_WINDOW, sr=24000):
    """Harmonic chirps an octave up (rising) or down, `rate` per second: the same frames either way."""
    rng = np.random.default_rng(seed)
    out, t = np.zeros(n), rng.uniform(0, 1.0 / rate)
    L = int(0.15 * sr)
    u = np.arange(L) / L
    f0 = 400 * 2 ** (u if rising else 1 - u)
    ph = 2 * np.pi * np.cumsum(f0) / sr
    call = sum(np.sin(h * ph) / h for h in range(1, 6)) * np.hanning(L)
    while t < n / sr - 0.2:
        i = int(t * sr)
        out[i:i + L] += call[:n - i]
        t += rng.uniform(0.9, 1.1) / rate
    return (out + 0.01 * rng.standard_normal(n)).astype(np.float32)


def test_structure_judge_sees_order_where_the_bag_judge_cannot():
    kinds = [(True, 3), (False, 3), (True, 6), (False, 6)]      # rising / falling, slow / fast
    y = np.repeat(np.arange(4), 12)
    waves = np.stack([_chirps(*kinds[c], seed=i) for i, c in enumerate(y)])
    frames = AF.log_mel_frames(waves)
    train = np.arange(len(y)) % 3 != 0
    noise = AF.log_mel_frames(np.random.default_rng(1).standard_normal((int((~train).sum()), M.AUDIO_WINDOW)))
    res = metrics.structure_scores(frames[train], y[train], {"gt": frames[~train], "noise": noise}, y[~train], 4)
    assert res["gt"]["value"] >= 0.75                  # ground-truth calls near the ceiling
    assert res["gt_shuffled"]["value"] <= 0.4          # the same frames, shuffled: near chance (0.25)
    assert res["noise"]["floor_to_ceiling"] <= 0.35    # noise near the floor
    # the mean/std judge cannot tell a rising call from a falling one: its errors are what this judge adds
    bag = AF.fit_logreg(AF.clip_embedding(frames=frames[train]), y[train], 4)
    bag_acc = (AF.predict_proba(bag, AF.clip_embedding(frames=frames[~train])).argmax(1) == y[~train]).mean()
    assert res["gt"]["value"] > bag_acc + 0.2


# --- rgb -> depth / normal: baselines and decoded metrics with known answers

def test_depth_and_normal_metrics_known_answers():
    g = np.random.default_rng(0).uniform(1.0, 5.0, (3, 8, 8))
    perfect = metrics.depth_metrics(g, g)
    assert np.allclose(perfect["rmse"], 0) and np.allclose(perfect["absrel"], 0) and np.allclose(perfect["delta1"], 1)
    assert np.allclose(metrics.depth_metrics(g + 3.0, g)["rmse"], 3.0)
    scaled = metrics.depth_metrics(g * 1.1, g)
    assert np.allclose(scaled["absrel"], 0.1) and np.allclose(scaled["delta1"], 1.0)
    assert np.allclose(metrics.depth_metrics(g * 2.0, g)["delta1"], 0.0)
    up = np.zeros((2, 4, 4, 3)); up[..., 2] = 1.0
    side = np.zeros((2, 4, 4, 3)); side[..., 0] = 1.0
    same, crossed = metrics.normal_metrics(up, up), metrics.normal_metrics(side, up)
    assert np.allclose(same["angle"], 0) and np.allclose(same["within_11.25"], 1)
    assert np.allclose(crossed["angle"], 90.0) and np.allclose(crossed["within_11.25"], 0)
    # uint8 images round-trip to unit vectors: c = 255 (n + 1) / 2
    img = np.full((1, 2, 2, 3), 128, dtype=np.uint8); img[..., 2] = 255
    assert np.allclose(metrics.normal_vectors(img)[..., 2], 1.0, atol=0.01)


def test_depth_edge_f1_finds_the_silhouette_and_not_the_floor():
    """A floor whose depth grows 2% a row (under the 1.25x jump) with a square twice as near on it: the truth
    scores 1, the same square 1 px off still 1 (within 2 px), 6 px off far less, the floor alone 0 (its
    gradient is no edge), and a map with no edge in its truth gives nan (not counted)."""
    floor = np.broadcast_to(10.0 * 1.02 ** np.arange(32)[:, None], (32, 32))

    def scene(dy=0, dx=0):
        d = floor.copy()
        d[10 + dy:20 + dy, 10 + dx:20 + dx] /= 2.0
        return d[None]

    truth = scene()
    assert metrics.depth_edges(truth).sum() > 0 and not metrics.depth_edges(floor[None]).any()
    assert metrics.edge_f1(truth, truth)[0] == pytest.approx(1.0)
    assert metrics.edge_f1(scene(1, -1), truth)[0] == pytest.approx(1.0)
    assert metrics.edge_f1(scene(6, 6), truth)[0] < 0.5
    assert metrics.edge_f1(floor[None], truth)[0] == 0.0
    assert np.isnan(metrics.edge_f1(truth, floor[None])[0])
    assert metrics.depth_metrics(truth, truth)["edge_f1"][0] == pytest.approx(1.0)


def test_outline_f1_scores_the_objects_outline_alone():
    """The square of the test above as the object (its mask): the truth scores 1, the square 1 px off still 1,
    the floor alone 0; a stray edge far from the square costs edge_f1 but not the outline's F1; an outline the
    truth does not draw (the mask elsewhere) gives nan. depth_metrics reports it, and its small third."""
    floor = np.broadcast_to(10.0 * 1.02 ** np.arange(32)[:, None], (32, 32))

    def scene(dy=0, dx=0, stray=False):
        d = floor.copy()
        d[10 + dy:20 + dy, 10 + dx:20 + dx] /= 2.0
        if stray:
            d[26:30, 2:6] /= 2.0
        return d[None]

    mask = np.zeros((1, 32, 32), dtype=bool)
    mask[0, 10:20, 10:20] = True
    truth = scene()
    assert metrics.outline_f1(truth, truth, mask)[0] == pytest.approx(1.0)
    assert metrics.outline_f1(scene(1, -1), truth, mask)[0] == pytest.approx(1.0)
    assert metrics.outline_f1(floor[None], truth, mask)[0] == 0.0
    assert metrics.edge_f1(scene(stray=True), truth)[0] < 0.9
    assert metrics.outline_f1(scene(stray=True), truth, mask)[0] == pytest.approx(1.0)
    assert np.isnan(metrics.outline_f1(truth, floor[None], mask)[0])
    three = np.concatenate([mask, mask, np.ones_like(mask)])   # the third is all object: no outline inside
    out = metrics.depth_metrics(np.concatenate([truth] * 3), np.concatenate([truth] * 3), masks=three)
    assert out["outline_f1"][:2] == pytest.approx([1.0, 1.0]) and np.isnan(out["outline_f1"][2])
    assert np.isfinite(out["outline_f1_small"][:2]).all() and np.isnan(out["outline_f1_small"][2])


def test_toyzoo_animal_masks_are_where_the_written_depth_is_the_animals(tmp_path):
    """The masks re-rendered from a clip's seed sit where its written depth map has the animal: nearer than
    the ground and sky behind their outline, the same as render_view's; another world version is refused."""
    import toyzoo
    from PIL import Image
    raw = str(tmp_path)
    toyzoo.build_toyzoo(raw, clips_per_class=1, classes=["cat"], workers=1)
    masks = toyzoo.animal_masks(raw, ["cat_00000", "cat_00000"], [0, 3])
    assert masks.shape == (2, toyzoo.SIZE, toyzoo.SIZE) and masks.dtype == bool
    for i, view in enumerate((0, 3)):
        depth = np.asarray(Image.open(os.path.join(raw, "clips", "cat_00000", f"depth_{view:02d}.png")), np.float64)
        assert 0.005 < masks[i].mean() < 0.5
        ring = metrics.near_pixels(masks[i:i + 1], 2)[0] & ~masks[i]     # just outside the outline
        assert np.median(depth[masks[i]]) < np.median(depth[ring])
    with open(os.path.join(raw, "toyzoo.json")) as f:
        world = json.load(f)
    with open(os.path.join(raw, "toyzoo.json"), "w") as f:
        json.dump({**world, "world": world["world"] - 1}, f)
    with pytest.raises(ValueError, match="version"):
        toyzoo.animal_masks(raw, ["cat_00000"], [0])


def test_per_position_majority_known_answer():
    ids = np.array([[1, 5, 7], [1, 6, 7], [2, 6, 7]])
    assert metrics.per_position_majority(ids).tolist() == [1, 6, 7]


def test_structure_decoded_scores_truth_perfectly_and_the_mean_map_as_it_should():
    """A depth codebook of 4 flat levels: every train map decodes to one level, so the per-position mean
    map is known; predicted = truth scores perfectly, and the mean-map baseline's RMSE is what it should be."""
    from modality_tokenizers import PatchKMeansTokenizer
    levels = torch.tensor([[-1.0], [-0.3], [0.3], [1.0]])
    tok = PatchKMeansTokenizer("tok_depth", levels, torch.zeros(1, 64), {"depth_ref": [1.0, 1.0]})
    L = M.BY_NAME["tok_depth"].length
    train = np.zeros((4, M.NUM_VIEWS, L), dtype=np.int64)
    train[:2], train[2:] = 0, 3                      # half the train maps at level 0, half at level 3
    truth = np.full((3, L), 3, dtype=np.int64)
    out, rows = E.structure_decoded(tok, "tok_depth", truth, truth, train, "train", train_maps=40, seed=0)
    assert out["rmse"]["model"]["value"] == pytest.approx(0.0) and out["delta1"]["model"]["value"] == pytest.approx(1.0)
    maps = tok.decode(torch.tensor([[0] * L, [3] * L])).astype(np.float64)
    lo, hi = maps[0].mean(), maps[1].mean()          # the two flat decoded levels
    n_lo = (np.random.default_rng([0, 8]).permutation(4 * M.NUM_VIEWS)[:40] < 2 * M.NUM_VIEWS).sum()
    mean = (n_lo * lo + (40 - n_lo) * hi) / 40
    assert out["rmse"]["per_position_mean"]["value"] == pytest.approx(abs(hi - mean), rel=1e-6)
    assert out["baseline_to_beat"] == "per_position_mean" and len(rows) == 4 and out["train_split"] == "train"
    # the far / near split: the truth (level 3) is at the train maps' 90th percentile, so every pixel is far
    # (the same RMSE as over the whole map) and none is near (no row)
    assert out["far_beyond"] == pytest.approx(hi) and np.isnan(out["rmse_near"]["model"]["value"])
    assert out["rmse_far"]["per_position_mean"]["value"] == pytest.approx(abs(hi - mean), rel=1e-6)


def _planted_local_cross_attention(model):
    """Every block else an identity: the decoder's queries and the encoder's keys are the tokens' positions alone,
    and the one cross-attention head compares them, sharpened."""
    cross = model.decoder[0].cross_attn
    for p in (model.wte.weight, model.wme.weight, model.mask_token, model.encoder[0].attn.proj.weight,
              model.encoder[0].mlp.proj.weight, model.decoder[0].self_attn.proj.weight):
        p.zero_()
    cross.q.weight.copy_(torch.eye(32) * 200.0)
    cross.kv.weight.copy_(torch.cat([torch.eye(32), torch.zeros(32, 32)]))


def test_cross_attention_locality_known_answers():
    """Queries that carry nothing attend uniformly: the figures are uniform attention's exactly. A planted
    local head puts its mass on the cell's own rgb cell."""
    from model import Nano4M, Nano4MConfig
    torch.manual_seed(0)
    model = Nano4M(Nano4MConfig(n_enc_layer=1, n_dec_layer=1, n_embd=32, n_head=1, pos_emb="sincos_layout")).eval()
    rgb = torch.randint(0, M.BY_NAME["tok_rgb"].vocab, (3, M.GRID * M.GRID))
    inputs, cells = {"tok_rgb": (rgb, E.all_given(rgb))}, np.arange(M.GRID * M.GRID)
    look = lambda radius: E.cross_attention_locality(model, inputs, "tok_depth", cells, E.near_place("tok_rgb", radius),
                                                     "cpu")
    with torch.no_grad():
        model.decoder[0].cross_attn.q.weight.zero_()
        flat, own = look(1), look(0)
        assert flat["near"] == pytest.approx(flat["uniform_near"], abs=1e-6)
        assert flat["uniform_near"] == pytest.approx((12 * 12 * 9 + 4 * 12 * 6 + 4 * 4) / 196 ** 2)   # 3x3, edges cut
        assert own["near"] == pytest.approx(1 / 196, abs=1e-6) == pytest.approx(own["uniform_near"])
        _planted_local_cross_attention(model)
        own, local = look(0), look(1)
    assert own["near"] > 0.9 and local["near"] > 0.9 and local["n_rows"] == 3


def test_audio_infill_locality_known_answers():
    """The audio side of the figure: with half the frames given, uniform queries put on the neighbouring frames
    exactly their share of the given tokens; a planted head that matches 1-D frame positions puts most of its mass
    within 2 frames of the queried one."""
    from model import Nano4M, Nano4MConfig
    torch.manual_seed(0)
    model = Nano4M(Nano4MConfig(n_enc_layer=1, n_dec_layer=1, n_embd=32, n_head=1, pos_emb="sincos_layout")).eval()
    tokens = {"tok_audio": torch.randint(0, M.BY_NAME["tok_audio"].vocab, (2, M.BY_NAME["tok_audio"].length)),
              "caption": torch.randint(0, 50, (2, M.CAPTION_LEN))}
    with torch.no_grad():
        model.decoder[0].cross_attn.q.weight.zero_()
        flat = E.audio_infill_locality(model, tokens, "cpu")
        assert flat["near"] == pytest.approx(flat["uniform_near"], abs=1e-6) and 0.0 < flat["uniform_near"] < 0.1
        _planted_local_cross_attention(model)
        local = E.audio_infill_locality(model, tokens, "cpu")
    assert local["near"] > 0.8 and local["n_rows"] == 2


def test_depth_metrics_split_the_error_between_far_and_near_pixels():
    g = np.array([[[1.0, 1.0], [10.0, 10.0]]])       # a near row and a far row
    p = g + np.array([[[1.0, 1.0], [4.0, 4.0]]])
    r = metrics.depth_metrics(p, g, far=5.0)
    assert r["rmse_near"][0] == pytest.approx(1.0) and r["rmse_far"][0] == pytest.approx(4.0)
    assert r["rmse"][0] == pytest.approx(np.sqrt((1 + 16) / 2))
    assert np.isnan(metrics.depth_metrics(p, g, far=100.0)["rmse_far"][0])
    assert metrics.depth_metrics(p, g, far=10.0)["rmse_far"][0] == pytest.approx(4.0)   # at least that far


def test_mbr_decoding_picks_the_id_nearest_the_expected_patch_where_argmax_picks_a_mode():
    """A decoder split evenly between two flat depth levels (-0.3 and 1.0): argmax returns one of them, the
    minimum-expected-error rule the level nearest their mean (0.35 -> 0.3), in every cell; the 'mean' rule
    that mean itself."""
    from modality_tokenizers import PatchKMeansTokenizer
    tok = PatchKMeansTokenizer("tok_depth", torch.tensor([[-1.0], [-0.3], [0.3], [1.0]]), torch.zeros(1, 64),
                               {"depth_ref": [1.0, 1.0]})

    class TwoModes(torch.nn.Module):
        def decode_hidden(self, e_ids, e_pos, e_valid, d_pos, d_valid):
            return torch.zeros(*d_pos.shape, 1)

        def modality_logits(self, h, m):
            logits = torch.full((*h.shape[:-1], M.MODALITIES[m].vocab), -1e4)
            logits[..., 1] = logits[..., 3] = 0.0
            return logits

    rgb = torch.zeros(2, M.BY_NAME["tok_rgb"].length, dtype=torch.long)
    inputs, L = {"tok_rgb": (rgb, E.all_given(rgb))}, M.BY_NAME["tok_depth"].length
    assert set(E.argmax_ids(TwoModes(), inputs, "tok_depth", np.arange(L), "cpu", 2).unique().tolist()) <= {1, 3}
    assert (E.mbr_ids(TwoModes(), rgb, "tok_depth", "cpu", 2, tok) == 2).all()
    # the 'mean' read-out keeps the expected patch itself (0.35, between the codes) and decodes it as a map
    v, top = E.expected_patches(TwoModes(), rgb, "tok_depth", "cpu", 1, tok)
    assert torch.allclose(v, torch.full_like(v, 0.35)) and set(top.unique().tolist()) <= {1, 3}
    maps = E.decoded_maps(tok, "tok_depth", v.numpy(), vectors=True)
    assert maps.shape == (2, 224, 224) and np.all(maps == np.round(np.expm1(0.35 * 1.0 + 1.0)))


def test_shape_mode_reads_the_expected_mean_with_the_likeliest_shape():
    """A product code of 2 means x 2 shapes (id = mean * 2 + shape) with p = (0.3, 0.05, 0.35, 0.3): shape 0 is
    the likelier (0.65), the expected mean 0.35 * m0 + 0.65 * m1; 'mean' mixes the two shapes instead."""
    from modality_tokenizers import PatchKMeansTokenizer
    half = torch.cat([torch.ones(32), -torch.ones(32)])
    tok = PatchKMeansTokenizer("tok_depth", torch.tensor([[-1.0], [1.0]]), torch.stack([half, -half]),
                               {"depth_ref": [1.0, 1.0]})
    p = torch.tensor([0.3, 0.05, 0.35, 0.3])

    class Fixed(torch.nn.Module):
        def decode_hidden(self, e_ids, e_pos, e_valid, d_pos, d_valid):
            return torch.zeros(*d_pos.shape, 1)

        def modality_logits(self, h, m):
            logits = torch.full((*h.shape[:-1], M.MODALITIES[m].vocab), -1e4)
            logits[..., :4] = p.log()
            return logits

    rgb = torch.zeros(2, M.BY_NAME["tok_rgb"].length, dtype=torch.long)
    mean_level = 0.35 * -1.0 + 0.65 * 1.0
    v, top = E.expected_patches(Fixed(), rgb, "tok_depth", "cpu", 1, tok, shape_mode=True)
    assert torch.allclose(v, (mean_level + half).expand_as(v), atol=1e-5) and (top == 2).all()
    mixed, _ = E.expected_patches(Fixed(), rgb, "tok_depth", "cpu", 1, tok)
    assert torch.allclose(mixed, (mean_level + 0.3 * half).expand_as(mixed), atol=1e-5)   # (0.65 - 0.35) * half


def test_val_and_test_draw_different_samples_from_one_seed():
    """Class-only generation sees only the caption: the sampler's generator must differ by split, or a
    choice made on val is judged on test by the same samples; the same split and seed repeat exactly."""
    from types import SimpleNamespace
    draw = lambda split, seed=1337: torch.rand(4, generator=E.sampling_generator(SimpleNamespace(seed=seed, split=split)))
    assert torch.equal(draw("val"), draw("val")) and not torch.equal(draw("val"), draw("test"))
    assert not torch.equal(draw("val"), draw("val", seed=2))


# --- end to end on a tiny random checkpoint and a tiny tokenized dataset

def _write_split(tok, split, labels, ids_of):
    """One split of a tokenized dataset on disk: ids_of(modality) -> its ids, then labels and clip ids."""
    os.makedirs(os.path.join(tok, split))
    for m in M.MODALITIES:
        ids_of(m).astype(np.uint16).tofile(os.path.join(tok, split, m.name + ".bin"))
    labels.astype(np.uint16).tofile(os.path.join(tok, split, "label.bin"))
    with open(os.path.join(tok, split, "clip_ids.json"), "w") as f:
        json.dump([f"{split}_{i:03d}" for i in range(len(labels))], f)


def _make_fixture(root, classes=("cat", "pig", "pigeon"), n={"train": 6, "test": 6}):
    from model import Nano4M, Nano4MConfig
    from modality_tokenizers import MelRVQTokenizer, PatchKMeansTokenizer
    tok = os.path.join(root, "data", "fx", "tok")
    os.makedirs(os.path.join(tok, "codebooks"))
    rng = np.random.default_rng(0)
    meta = {"dataset": "fx", "class_names": list(classes), "num_views": M.NUM_VIEWS, "splits": dict(n),
            "modalities": {}}
    for m in M.MODALITIES:
        meta["modalities"][m.name] = {"shape": [M.NUM_VIEWS, m.length] if m.per_view else [m.length],
                                      "vocab": m.vocab, "tokenizer": "gpt2_bpe", "codebook": None}
    K = 16
    meta["modalities"]["tok_audio"].update(tokenizer="mel_rvq", codebook="codebooks/tok_audio.pt")
    cb = torch.randn(2, K, 80) * 0.5 - 4
    MelRVQTokenizer(cb, {"griffin_lim_iters": 2}).save(os.path.join(tok, "codebooks", "tok_audio.pt"))
    for name, channels in (("tok_rgb", 3), ("tok_depth", 1), ("tok_normal", 3)):
        meta["modalities"][name].update(tokenizer="patch_kmeans", codebook=f"codebooks/{name}.pt")
        PatchKMeansTokenizer.fit(name, torch.rand(256, channels * 8 * 8) * 2 - 1, 4, 8, iters=2).save(
            os.path.join(tok, "codebooks", f"{name}.pt"))

    def ids(m, labels):
        if m.name == "caption":
            return np.stack([S.encode_caption(S.caption_text(classes[c])) for c in labels])
        if m.name == "tok_audio":
            return S.interleave_audio(rng.integers(0, K, (len(labels), M.NUM_VIEWS, 2, M.AUDIO_FRAMES)))
        return rng.integers(0, 64, (len(labels), M.NUM_VIEWS, m.length))

    for split, count in n.items():
        labels = np.arange(count) % len(classes)
        _write_split(tok, split, labels, lambda m: ids(m, labels))
    with open(os.path.join(tok, "meta.json"), "w") as f:
        json.dump(meta, f)
    args = dict(n_enc_layer=1, n_dec_layer=1, n_embd=32, n_head=2)
    torch.manual_seed(0)
    model = Nano4M(Nano4MConfig(**args))
    out = os.path.join(root, "out")
    os.makedirs(out)
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 0,
                "config": {"dataset": "fx", "data_root": os.path.join(root, "data"), "input_budget": (8, 64),
                           "target_budget": (8, 64)}}, os.path.join(out, "ckpt.pt"))
    with open(os.path.join(out, "log.jsonl"), "w") as f:
        for it in (0, 10):
            f.write(json.dumps({"iter": it, "val": {"loss": 5.0 - it / 10, "tok_audio": 7.0 - it / 10}}) + "\n")
    return out


def test_end_to_end_tiny(tmp_path):
    out = _make_fixture(str(tmp_path))
    s = E.default_settings()
    s.update(out_dir=out, device="cpu", gallery=6, gen_per_class=2, gen_steps=2, clf_per_class=2, ce_batches=2,
             batch_size=8, structure_views=2, audio_players=1, resnet_weights="random", reference_reader=True,
             reader_epochs=1)
    res = E.run(s)
    assert res["failed"] == []
    d = os.path.join(out, "eval", "test")
    with open(os.path.join(d, "results.json")) as f:
        saved = json.load(f)
    for p in E.ALL_PROBES:
        assert saved["probes"][p]["status"] in ("ok", "skipped"), (p, saved["probes"][p])
        if saved["probes"][p]["status"] == "skipped":
            assert saved["probes"][p]["reason"]
    try:
        import torchvision  # noqa: F401
        must_run = E.ALL_PROBES
    except ImportError:
        must_run = tuple(p for p in E.ALL_PROBES if p != "resnet")
    for p in must_run:
        assert saved["probes"][p]["status"] == "ok", (p, saved["probes"][p])
    P = saved["probes"]
    assert P["class"]["n"] == 6 and len(P["class"]["confusion"]) == 3
    assert 0.0 <= P["class"]["top1"]["value"] <= 1.0
    assert P["class"]["rgb_to_class"]["n"] == 6 and 0.0 <= P["class"]["rgb_to_class"]["top1"]["value"] <= 1.0
    # every view of the eval clips is scored too: a mean over views and a whole-clip figure
    assert P["class"]["views"]["views_per_clip"] == 10 and 0.0 <= P["class"]["whole_clip"]["top1"]["value"] <= 1.0
    assert len(P["retrieval"]["audio->rgb"]["curve"]) == 6
    assert len(P["retrieval"]["rgb->audio"]["both_directions"]["curve"]) == 6
    assert len(P["retrieval"]["fused"]["rgb->audio"]["curve"]) == 6
    assert len(P["retrieval"]["class_pivot"]["audio->rgb"]["curve"]) == 6
    # the diagnostic: the same fusion with the rgb class from a reader fit to the train pictures
    Rr = P["retrieval"]["reference_reader"]
    assert Rr["rgb_class_top1"]["n"] == 6 and len(Rr["audio->rgb"]["curve"]) == 6 and "tokenizer vectors" in Rr["how"]
    # whole clips: every pair scored on all 10 views, then ranked the same three ways
    W = P["retrieval"]["whole_clip"]
    assert W["views_summed"] == 10 and 0.0 <= W["rgb_class_top1"]["whole_clip"] <= 1.0
    assert all(len(W[k][d]["curve"]) == 6 for k in ("both_directions", "class_pivot", "fused")
               for d in ("audio->rgb", "rgb->audio"))
    for m in P["ce"]["per_modality"].values():      # finite, and inside its interval (a NaN bound fails here)
        assert all(math.isfinite(x) for x in (m["ce"], *m["ci"])) and m["ci"][0] <= m["ce"] <= m["ci"][1], m
    # the model trained the per-modality head: its CE is not the report's quantity, and the table says so
    audio_ce = [r for r in saved["table"] if r["metric"] == "eval CE tok_audio (nats)"][0]
    assert audio_ce["report"] == 5.2 and "50,304" in audio_ce["report_differs"]
    r5 = [r for r in saved["table"] if r["metric"] == "audio->rgb R@5"][0]
    assert "gallery of 6" in r5["report_differs"]
    lo, hi = P["entropy"]["bias_corrected_ci"]
    assert lo <= P["entropy"]["bias_corrected"] <= hi
    assert P["structure"]["tok_depth"]["n_images"] == 12
    for name, key in (("tok_depth", "rmse"), ("tok_normal", "angle")):
        dec = P["structure"][name]["decoded"]
        assert dec["n_images"] == 12 and dec["baseline_to_beat"] == "per_position_mean"
        assert all(math.isfinite(dec[key][who]["value"]) for who in ("model", "per_position_mean", "constant"))
        assert 0.0 <= P["structure"][name]["per_position_majority_acc"] <= 1.0
        look = P["structure"][name]["cross_attention"]
        assert 0.0 <= look["uniform_near"] < 0.1 and 0.0 <= look["near"] <= 1.0 and look["n_rows"] == 12
    assert 0.0 <= P["memo"]["cross_attention"]["near"] <= 1.0 and P["memo"]["cross_attention"]["n_rows"] == 6
    assert P["memo"]["train"]["n_clips"] == 6 and P["memo"]["test"]["n_clips"] == 6
    assert 0.0 <= P["memo"]["test"]["per_position_majority"] <= 1.0
    nxt = P["memo"]["next_frame"]
    assert all(0.0 < nxt[k] < 10.0 for k in ("given_past", "caption_alone", "bigram", "unigram")), nxt
    assert P["generation"]["n_per_setting"] == 6
    assert P["generation"]["sampler"]["gen_remask_noise"] == s["gen_remask_noise"] == 0.0   # recorded with the rest
    sj = P["generation"]["structure_judge"]
    assert {"gt", "gt_shuffled", "class_only", "continuation"} <= set(sj) and sj["class_only"]["n"] == 6
    # class-only generation at guidance 1 beside the default guidance (3)
    assert P["generation"]["class_only_g1_class_acc"]["n"] == P["generation"]["class_only_class_acc"]["n"] == 6
    energy = {r["metric"]: r for r in saved["table"] if r["metric"].startswith("energy spread class_only")}
    assert energy["energy spread class_only samples (guidance 1) / ground truth"]["report_differs"] is None
    assert "guidance 3" in energy["energy spread class_only samples (guidance 3) / ground truth"]["report_differs"]
    # FAD: clip level, the floor at the same n as each measurement, every figure with its interval
    F = P["fad"]
    for k in ("class_only", "class_only_g1", "continuation"):
        lo, hi = F[k]["ci"]
        assert F[k]["n_clips"] == 6 and all(math.isfinite(x) for x in (F[k]["overall"], lo, hi))
        assert lo <= F[k]["overall"] <= hi
    assert F["floor"]["n"] == F["floor_tail"]["n"] == 6 and "clip level" in F["embedding"]
    # an untrained model's class-only audio is far from real audio: above the real-vs-real floor's interval
    assert F["class_only"]["ci"][0] > F["floor"]["ci"][1]
    assert all(r["random"] is not None or r["metric"].startswith(("generation speed", "FAD-CLAP"))
               for r in saved["table"])
    html = open(os.path.join(d, "report.html")).read()
    assert "<svg" in html and "confusion matrix" in html and "data:image/png;base64" in html
    assert "validation CE during training" in html
    assert not [f for f in os.listdir(d) if ".tmp" in f]


def _planted_fixture(root, classes=("cat", "dog", "pig", "cow"), n={"train": 16, "test": 12}, steps=100):
    """A tokenized set where every clip's rgb and audio are its class's template (10% of tokens random), and a
    real tiny Nano4M trained for a hundred steps on it, on the probes' own directions (the whole audio or rgb
    in; the caption and 32 tokens of the other side out). Returns the checkpoint dir."""
    import masking
    from model import Nano4M, Nano4MConfig
    tok = os.path.join(root, "data", "pl", "tok")
    rng = np.random.default_rng(0)
    meta = {"dataset": "pl", "class_names": list(classes), "num_views": M.NUM_VIEWS, "splits": dict(n),
            "modalities": {m.name: {"shape": [M.NUM_VIEWS, m.length] if m.per_view else [m.length], "vocab": m.vocab,
                                    "tokenizer": "synthetic", "codebook": None} for m in M.MODALITIES}}
    C = len(classes)
    # class c's ids are its own (ids, or codes, 2c and 2c + 1, which of the two at random): a signal that a
    # hundred steps find
    own = lambda k, shape: np.arange(C).reshape(C, *([1] * len(shape))) * k + rng.integers(0, k, (C, *shape))
    templates = {"tok_rgb": own(2, (196,)), "tok_depth": own(2, (196,)), "tok_normal": own(2, (196,)),
                 "tok_audio": S.interleave_audio(own(2, (2, M.AUDIO_FRAMES)))}

    def ids(m, labels):
        if m.name == "caption":
            return np.stack([S.encode_caption(S.caption_text(classes[c])) for c in labels])
        a = np.repeat(templates[m.name][labels][:, None], M.NUM_VIEWS, 1)
        noise = rng.random(a.shape) < 0.1
        return np.where(noise, S.interleave_audio(rng.integers(0, 2 * C, (len(labels), M.NUM_VIEWS, 2, M.AUDIO_FRAMES)))
                        if m.name == "tok_audio" else rng.integers(0, 2 * C, a.shape), a)

    for split, count in n.items():
        labels = np.arange(count) % C
        _write_split(tok, split, labels, lambda m: ids(m, labels))
    with open(os.path.join(tok, "meta.json"), "w") as f:
        json.dump(meta, f)
    none = (0.0,) * 5
    # the whole source in; out, the caption and 32 tokens of the other side (as config/toyzoo.py binds them)
    also = {"rgb": (1.0, 0, 0, 0, 0), "audio": (0, 0, 0, 1.0, 0)}
    whole = lambda src, other: dict(weight=1.0, input_full=(src,), input_alphas=none, input_budget=(0, 0),
                                    target_full=("caption",), target_alphas=also[other], target_budget=(32, 32))
    cfg = masking.MaskingConfig(mixture=[whole("audio", "rgb"), whole("rgb", "audio")], mixture_per_batch=True)
    args = dict(n_enc_layer=1, n_dec_layer=1, n_embd=32, n_head=2, adapters=dict(init="torch"))
    torch.manual_seed(0)
    model = Nano4M(Nano4MConfig(**args))
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    train = M.open_split(tok, "train", meta)
    g = torch.Generator().manual_seed(0)
    first = last = None
    for _ in range(steps):
        clips = torch.randint(n["train"], (8,), generator=g).numpy()
        views = torch.randint(M.NUM_VIEWS, (8,), generator=g).numpy()
        tokens, _ = M.gather_views(train, clips, views)
        b = masking.build_batch(tokens, cfg, g)
        loss, _ = model(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"], b["dec_ids"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < first - 2.0, (first, last)                 # it trained
    out = os.path.join(root, "out")
    os.makedirs(out)
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": steps,
                "config": {"dataset": "pl", "data_root": os.path.join(root, "data")}}, os.path.join(out, "ckpt.pt"))
    return out


def test_class_and_retrieval_probes_find_a_planted_signal_through_a_trained_model(tmp_path):
    """Where each clip's sound and picture are its class's template, a tiny model trained a hundred steps
    names the class from either side and retrieves the same class's pictures for a sound (and back): the
    probes' figures must sit far above their chance, or the probes (not the model) are broken."""
    out = _planted_fixture(str(tmp_path))
    s = E.default_settings()
    s.update(out_dir=out, device="cpu", probes="class,retrieval", gallery=12, class_views=1, retrieval_views=1,
             batch_size=16)
    res = E.run(s)
    assert res["failed"] == []
    P = res["probes"]
    assert P["class"]["n"] == 12
    assert P["class"]["top1"]["value"] >= 0.75, P["class"]["top1"]               # chance 25%
    assert P["class"]["rgb_to_class"]["top1"]["value"] >= 0.75
    for d in ("audio->rgb", "rgb->audio"):
        r = P["retrieval"][d]
        assert r["gallery"] == 12 and r["R@5"]["value"] >= 0.75, (d, r["R@5"])   # chance 5/12
        same = r["prior_removed"]["class_level"]["top1_same_class"]
        assert same["value"] >= 0.75 and same["chance"] < 0.3, (d, same)


def test_ce_probe_of_a_full_head_model_is_the_reports_quantity(tmp_path):
    """A model trained with head='full' is scored as it trained, over every id: an untrained one sits near
    log(50,304), not log(2,048), and its audio CE stands beside the report's 5.2 with no caveat; the same
    weights with the per-modality head are scored over audio's own ids, with the caveat."""
    out = _make_fixture(str(tmp_path))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    got = {}
    for head in ("modality", "full"):
        ckpt["model_args"] = dict(ckpt["model_args"], head=head)
        torch.save(ckpt, os.path.join(out, "ckpt.pt"))
        s = E.default_settings()
        s.update(out_dir=out, device="cpu", probes="ce", ce_batches=2, batch_size=8)
        res = E.run(s)
        row = [r for r in res["table"] if r["metric"] == "eval CE tok_audio (nats)"][0]
        got[head] = (res["probes"]["ce"]["per_modality"]["tok_audio"]["ce"], row)
    (ce_m, row_m), (ce_f, row_f) = got["modality"], got["full"]
    assert abs(ce_m - math.log(2048)) < 0.3 and abs(ce_f - math.log(M.VOCAB_SIZE)) < 0.3
    assert row_f["random"] == pytest.approx(math.log(M.VOCAB_SIZE)) and row_f["report_differs"] is None
    assert row_m["random"] == pytest.approx(math.log(2048)) and "50,304" in row_m["report_differs"]


def test_audio_table_ce_known_answers():
    """Each class walks a fixed cycle of 8 codes: the class bigram on the previous code knows every next code
    (CE -log(lam + (1 - lam) / 8), up to the unigram's smoothing), the class unigram only that there are 8."""
    N, K, T = 20, 2, 64
    labels = np.arange(N) % 2
    codes = np.stack([(np.arange(T)[None] + 3 * labels[:, None] + k) % 8 + 8 * labels[:, None] for k in range(K)], 1)
    r = metrics.audio_table_ce(codes, labels, codes[:4], labels[:4], range(16, T, 16))
    assert r["n_ids"] == 4 * K * 3
    assert r["bigram"] == pytest.approx(-math.log(0.8 + 0.2 / 8), abs=2e-3)
    assert r["unigram"] == pytest.approx(math.log(8), abs=0.01)
    shuffled = np.random.default_rng(0).permuted(codes, axis=2)   # the order gone, the codes kept
    assert metrics.audio_table_ce(shuffled, labels, codes[:4], labels[:4], range(16, T, 16))["bigram"] > 1.5


def test_audio_next_frame_scores_each_slot_over_its_own_codebook():
    """A head that says nothing (all logits equal) costs exactly log V an id, given the past or not: each slot
    is scored over its own codebook's V ids, not the modality's K * V."""
    from model import Nano4M, Nano4MConfig
    torch.manual_seed(0)
    model = Nano4M(Nano4MConfig(n_enc_layer=1, n_dec_layer=1, n_embd=32, n_head=1)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    L, V = M.BY_NAME["tok_audio"].length, M.AUDIO_CODEBOOK_SIZE
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, V, (3, L), generator=g)
    audio = codes + (torch.arange(L) % M.AUDIO_CODEBOOKS) * V          # slot K*t + k holds a level-k id
    tokens = {"tok_audio": audio, "caption": torch.randint(0, 50, (3, M.CAPTION_LEN), generator=g)}
    train = (torch.randint(0, V, (6, L), generator=g) + (torch.arange(L) % M.AUDIO_CODEBOOKS) * V).numpy()
    r = E.audio_next_frame(model, tokens, np.array([0, 1, 0]), train, np.array([0, 1, 0, 1, 0, 1]), "cpu", 8)
    assert r["given_past"] == pytest.approx(math.log(V), abs=1e-4)
    assert r["caption_alone"] == pytest.approx(math.log(V), abs=1e-4)
    assert r["n_ids"] == 3 * len(r["frames"]) * M.AUDIO_CODEBOOKS and r["bigram"] > 0
