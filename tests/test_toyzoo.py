"""ToyZoo: determinism, layout, geometry of depth/normals, class separability, resumption."""
import hashlib
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import rawdata  # noqa: E402
import toyzoo  # noqa: E402
from modalities import AUDIO_WINDOW  # noqa: E402

SEP_SEED, SEP_CLIPS, SEP_DIFFICULTY = 7, 6, 0.2


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """All 11 classes, a few clips each, at low difficulty: shared by the layout, geometry and
    separability tests."""
    d = str(tmp_path_factory.mktemp("zoo"))
    rows = toyzoo.build_toyzoo(d, clips_per_class=SEP_CLIPS, difficulty=SEP_DIFFICULTY, seed=SEP_SEED, workers=2)
    return d, rows


def _hashes(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------------
# determinism and resumption

def test_deterministic_and_resumable(tmp_path):
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    kw = dict(clips_per_class=2, difficulty=0.5, classes=["dog", "duck"])
    rows_a = toyzoo.build_toyzoo(a, seed=3, workers=1, **kw)
    rows_b = toyzoo.build_toyzoo(b, seed=3, workers=2, **kw)   # the number of workers does not matter
    toyzoo.build_toyzoo(c, seed=4, workers=2, **kw)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) == 4 * 31 + 2   # 4 clips x (wav + 30 png), manifest, toyzoo.json
    assert ha == hb and rows_a == rows_b
    assert ha.keys() == hc.keys()
    differ = [k for k in ha if k.startswith("clips/") and ha[k] != hc[k]]
    assert len(differ) == 4 * 31, "another seed must change every file"

    # resumption: remove one clip (and leave a stale temp dir behind): only that clip is made again
    stamp = {k: os.stat(os.path.join(a, k)).st_mtime_ns for k in ha if k.startswith("clips/")}
    shutil.rmtree(os.path.join(a, "clips", "duck_00001"))
    os.makedirs(os.path.join(a, "clips", ".duck_00001.tmp"))
    with open(os.path.join(a, "clips", ".duck_00001.tmp", "audio.wav"), "w") as f:
        f.write("half-written")
    rows_again = toyzoo.build_toyzoo(a, seed=3, workers=1, **kw)
    assert rows_again == rows_a and _hashes(a) == ha
    assert not os.path.exists(os.path.join(a, "clips", ".duck_00001.tmp"))
    for k, t in stamp.items():
        if "duck_00001" not in k:
            assert os.stat(os.path.join(a, k)).st_mtime_ns == t, f"{k} was regenerated"

    # a different world in the same directory is refused, as are bad arguments
    with pytest.raises(ValueError, match="toyzoo.json"):
        toyzoo.build_toyzoo(a, seed=3, workers=1, clips_per_class=2, difficulty=0.9, classes=["dog"])
    with pytest.raises(ValueError, match="unknown ToyZoo classes"):
        toyzoo.build_toyzoo(str(tmp_path / "d"), classes=["unicorn"])
    with pytest.raises(ValueError, match="difficulty"):
        toyzoo.build_toyzoo(str(tmp_path / "d"), difficulty=1.5)


# ---------------------------------------------------------------------------------------------------
# layout

def test_manifest_split_and_files(zoo):
    d, rows = zoo
    assert rows == rawdata.read_manifest(os.path.join(d, "manifest.jsonl"))
    assert len(rows) == 11 * SEP_CLIPS and len({r["clip_id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(rawdata.ROW_FIELDS) <= set(r)
        assert r["source"] == "toyzoo" and r["caption"] == f"a photo of a {r['class']}"
        assert r["keyframe_times"] == [0.5 + i for i in range(10)] and r["duration_s"] == 10.0
        assert r["origin"]["seed"] == SEP_SEED
    for cls in toyzoo.CLASSES:
        splits = [r["split"] for r in rows if r["class"] == cls]
        n = len(splits)
        assert splits.count("val") == round(0.1 * n) and splits.count("test") == round(0.1 * n)
        assert splits.count("train") == n - 2 * round(0.1 * n)
    for r in rows[::7]:
        audio, sr = rawdata.read_wav(os.path.join(d, r["audio"]))
        assert sr == 24000 and len(audio) == 240000 and 0.2 < np.abs(audio).max() <= 1.0
        for f, dep, nor in zip(r["frames"], r["depths"], r["normals"]):
            rgb = rawdata.read_png(os.path.join(d, f))
            depth = rawdata.read_png(os.path.join(d, dep))
            n = toyzoo.decode_normals(rawdata.read_png(os.path.join(d, nor)))
            assert rgb.shape == (224, 224, 3) and rgb.dtype == np.uint8 and rgb.std() > 5
            assert depth.shape == (224, 224) and depth.dtype == np.uint16 and depth.min() > 0
            assert np.abs(np.linalg.norm(n, axis=-1) - 1).max() < 0.02


def test_calls_fill_every_view_window():
    """Every 3.41 s window centred on a keyframe (clamped to the clip) overlaps at least one call."""
    half = AUDIO_WINDOW / toyzoo.SR / 2
    for cls in toyzoo.CLASSES:
        for i in range(5):
            sched = toyzoo.clip_params(1, cls, i, 1.0)["schedule"]
            for t in toyzoo.KEYFRAME_TIMES:
                lo = min(max(t - half, 0.0), 10.0 - 2 * half)
                assert any(s < lo + 2 * half and s + dur > lo for s, dur, *_ in sched), (cls, i, t)


# ---------------------------------------------------------------------------------------------------
# depth and normals come from the same geometry as the RGB

def test_depth_and_normals_match_geometry(zoo):
    d, rows = zoo
    for r in rows[::11]:
        cls, idx = r["class"], r["origin"]["index"]
        params = toyzoo.clip_params(SEP_SEED, cls, idx, SEP_DIFFICULTY)
        scene = params["scene"]
        v = 4
        rgb, depth_m, _, mask = toyzoo.render_view(scene, toyzoo.KEYFRAME_TIMES[v])
        assert np.array_equal(rgb, rawdata.read_png(os.path.join(d, r["frames"][v])))
        depth = rawdata.read_png(os.path.join(d, r["depths"][v])).astype(np.float64)
        assert np.array_equal(depth, toyzoo.encode_depth(depth_m))
        n = toyzoo.decode_normals(rawdata.read_png(os.path.join(d, r["normals"][v])))
        ground, animal = mask == 1, mask == 2
        assert ground.sum() > 1000 and animal.sum() > 200
        assert np.all(depth[mask == 0] == toyzoo.SKY_DEPTH) and np.all(depth[mask > 0] < toyzoo.SKY_DEPTH)

        # ground normals: the world's up vector seen from this camera, pointing up in the image
        up = toyzoo.camera_basis(scene).T @ np.array([0.0, 1.0, 0.0])
        assert up[1] > 0.3
        assert np.abs(n[ground] - up).max() < 0.01

        # back-project depth to camera-space points: the ground points lie on a plane whose normal is
        # the written normal (agreement between the two files, not just with the renderer)
        tan = np.tan(np.deg2rad(r["origin"]["fov_deg"]) / 2)
        x = ((np.arange(224) + 0.5) / 224 * 2 - 1) * tan
        X, Y = np.meshgrid(x, -x)
        z = depth / 1000.0
        pts = np.stack([X * z, Y * z, -z], -1)
        near_ground = ground & (depth < 30000)
        g = pts[near_ground]
        _, _, vt = np.linalg.svd(g - g.mean(0), full_matrices=False)
        plane_n = vt[2] * np.sign(vt[2] @ up)
        assert np.degrees(np.arccos(np.clip(plane_n @ up, -1, 1))) < 1.0

        # on the animal, normals from depth gradients (cross product of neighbour differences) agree
        # with the written normals
        dx = pts[1:-1, 2:] - pts[1:-1, :-2]
        dy = pts[:-2, 1:-1] - pts[2:, 1:-1]
        nd = np.cross(dx, dy)
        nd /= np.linalg.norm(nd, axis=-1, keepdims=True) + 1e-12
        inner = animal[1:-1, 1:-1] & animal[1:-1, 2:] & animal[1:-1, :-2] & animal[2:, 1:-1] & animal[:-2, 1:-1]
        inner &= (np.abs(depth[1:-1, 2:] - depth[1:-1, :-2]) < 40) & (np.abs(depth[2:, 1:-1] - depth[:-2, 1:-1]) < 40)
        cos = (nd[inner] * n[1:-1, 1:-1][inner]).sum(-1)
        assert np.median(np.degrees(np.arccos(np.clip(cos, -1, 1)))) < 12

        # the animal occludes: the pixel just above its silhouette (ground, sky or a prop behind) is farther
        top = animal[1:] & ~animal[:-1]
        rows_i, cols_i = np.nonzero(top)
        assert len(rows_i) > 5 and np.all(depth[rows_i + 1, cols_i] < depth[rows_i, cols_i])


# ---------------------------------------------------------------------------------------------------
# the classes are separable from simple statistics

def _mel_filters(n_fft=1024, n_mels=40, sr=24000, fmin=50.0, fmax=11000.0):
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    imel = lambda m: 700 * (10 ** (m / 2595) - 1)
    edges = imel(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    f = np.fft.rfftfreq(n_fft, 1 / sr)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0, np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)))


def _logmel(audio, fb, hop=512):
    """40-band log-mel of a clip -> [40, frames]."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, 1024)[::hop] * np.hanning(1024)
    return np.log(fb @ (np.abs(np.fft.rfft(frames, axis=1)) ** 2).T + 1e-8)


def _audio_features(audio, fb):
    """mean + std of 40 log-mel bands over the 3.41 s window of each keyframe -> [10, 80]."""
    hop, half = 512, AUDIO_WINDOW // 2
    logmel = _logmel(audio, fb, hop)
    feats = []
    for t in toyzoo.KEYFRAME_TIMES:
        c = min(max(int(t * 24000), half), len(audio) - half)
        w = logmel[:, (c - half) // hop:(c + half - 1024) // hop + 1]
        feats.append(np.concatenate([w.mean(1), w.std(1)]))
    return np.array(feats)


def _image_features(rgb, depth, normal):
    """colour statistics of the foreground: a 4x4x4 RGB histogram plus the mean and std of each channel
    over the pixels that are neither sky (depth 65535) nor ground (the one normal shared by the most
    pixels: the ground plane's, constant in camera space). The background is drawn independently of the
    class, so whole-image statistics mostly measure it."""
    key = normal.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1])
    solid = depth.reshape(-1) < toyzoo.SKY_DEPTH
    vals, counts = np.unique(key[solid], return_counts=True)
    px = rgb.reshape(-1, 3)[solid & (key != vals[counts.argmax()])]
    if len(px) < 50:
        px = rgb.reshape(-1, 3)
    q = (px // 64).astype(int)
    hist = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / len(q)
    return np.concatenate([np.sqrt(hist), px.mean(0) / 255, px.std(0) / 255])


def _logreg_accuracy(xtr, ytr, xte, yte, n_classes=11, steps=400, lr=0.5, wd=0.1):
    """Multinomial logistic regression by plain gradient descent on standardised features."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = np.zeros((xtr.shape[1], n_classes))
    b = np.zeros(n_classes)
    onehot = np.eye(n_classes)[ytr]
    for _ in range(steps):
        z = xtr @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(xtr)
        w -= lr * (xtr.T @ g + wd * w)
        b -= lr * g.sum(0)
    return float(((xte @ w + b).argmax(1) == yte).mean())


def _separability(zoo, folds=3):
    """Per-view accuracy of audio and image classifiers on clips they were not trained on: k-fold over
    clips (fold = clip index mod k, so every fold holds every class), every clip predicted once.
    At a few clips per class the fixed 80/10/10 split would hold out too few clips for a stable figure."""
    d, rows = zoo
    fb = _mel_filters()
    xa, xi, y, fold = [], [], [], []
    for r in rows:
        audio, _ = rawdata.read_wav(os.path.join(d, r["audio"]))
        xa.append(_audio_features(audio, fb))
        # every other keyframe: the views of a clip differ only by a little motion
        xi.append(np.array([_image_features(*(rawdata.read_png(os.path.join(d, r[k][v]))
                                              for k in ("frames", "depths", "normals"))) for v in range(0, 10, 2)]))
        y.append(toyzoo.CLASSES.index(r["class"]))
        fold.append(r["origin"]["index"] % folds)
    y, fold = np.array(y), np.array(fold)
    accs = []
    # (weight decay: light for the audio features, stronger for the sparser colour histograms)
    for x, views, wd in ((np.concatenate(xa), 10, 1e-3), (np.concatenate(xi), 5, 0.1)):
        yv, fv = np.repeat(y, views), np.repeat(fold, views)
        right = sum((_logreg_accuracy(x[fv != k], yv[fv != k], x[fv == k], yv[fv == k], wd=wd) * (fv == k).sum())
                    for k in range(folds))
        accs.append(float(right / len(yv)))
    return accs[0], accs[1], len(rows)


def test_classes_separable(zoo):
    acc_audio, acc_image, n = _separability(zoo)
    print(f"\nper-view accuracy on held-out clips ({n} clips, 3-fold, chance {1 / 11:.3f}): "
          f"audio log-mel {acc_audio:.3f}, image foreground colour {acc_image:.3f}")
    assert acc_audio > 0.5
    assert acc_image > 0.25


def test_habitat_shared_by_sound_and_picture(zoo):
    """What a clip's sound and picture share beyond the class: its habitat sets the ground and sky colours and
    the spectrum of the ambient noise between calls. Both must tell it, on clips the classifier never saw."""
    d, rows = zoo
    fb = _mel_filters()
    names = [h[0] for h in toyzoo.HABITATS]
    xa, xi, y, fold = [], [], [], []
    for r in rows:
        audio, _ = rawdata.read_wav(os.path.join(d, r["audio"]))
        logmel = _logmel(audio, fb)
        quiet = logmel[:, np.argsort(logmel.mean(0))[:logmel.shape[1] // 10]]      # the quietest 10%: ambient
        xa.append(quiet.mean(1) - quiet.mean())                                     # its spectral shape
        rgb, depth = (rawdata.read_png(os.path.join(d, r[k][0])) for k in ("frames", "depths"))
        sky = depth == toyzoo.SKY_DEPTH
        xi.append(np.concatenate([rgb[~sky].mean(0), rgb[sky].mean(0) if sky.any() else np.zeros(3)]) / 255)
        y.append(names.index(r["origin"]["habitat"]))
        fold.append(r["origin"]["index"] % 3)
    y, fold = np.array(y), np.array(fold)
    for what, x, floor in (("ambient sound", np.array(xa), 0.6), ("ground and sky", np.array(xi), 0.6)):
        right = sum(_logreg_accuracy(x[fold != k], y[fold != k], x[fold == k], y[fold == k], len(names),
                                     wd=1e-3) * (fold == k).sum() for k in range(3))
        acc = right / len(y)
        print(f"\nhabitat from the {what}: {acc:.3f} on held-out clips (chance {1 / len(names):.3f}, n={len(y)})")
        assert acc > floor, what
