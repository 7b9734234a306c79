"""tokenize_all.py on a small raw fixture made with rawdata.py's writers: shapes, ranges, meta.json,
decoding through load_tokenizer, resuming after a kill, and bad input refused with the clip named."""
import json
import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import modalities as M  # noqa: E402
import streams as S  # noqa: E402
import modality_tokenizers as T  # noqa: E402
import rawdata  # noqa: E402
import tokenize_all  # noqa: E402

CLASSES = ["cow", "dog", "duck"]
SPLITS = ["train", "train", "train", "val", "test"]   # per class -> 15 clips
# tiny codebooks so fitting takes a fraction of a second
FAST = ["--audio_codes=16", "--rgb_codes=4x8", "--depth_codes=2x8", "--normal_codes=2x8", "--kmeans_iters=4",
        "--fit_clips=4", "--fit_vectors=4000", "--batch_size=2", "--device=cpu"]


def make_clip(clip_dir, cls, k, seed, seconds=4.0):
    """One synthetic clip: a class-pitched tone with a pulsing envelope; images of a coloured square."""
    rng = np.random.default_rng(seed)
    os.makedirs(clip_dir, exist_ok=True)
    t = np.arange(int(seconds * rawdata.RAW_SR)) / rawdata.RAW_SR
    f0 = 150 * (1 + CLASSES.index(cls)) * (1 + 0.05 * rng.standard_normal())
    audio = 0.3 * np.sin(2 * np.pi * f0 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t)) \
        + 0.01 * rng.standard_normal(len(t))
    rawdata.write_wav(os.path.join(clip_dir, "audio.wav"), audio)
    colour = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220]][CLASSES.index(cls)], np.uint8)
    for v in range(rawdata.RAW_VIEWS):
        img = np.full((224, 224, 3), 90 + 10 * v, np.uint8)
        y, x = rng.integers(20, 120, 2)
        img[y:y + 80, x:x + 80] = colour
        depth = np.full((224, 224), 30000, np.uint16)
        depth[y:y + 80, x:x + 80] = 8000 + 500 * v
        normal = np.full((224, 224, 3), (128, 128, 255), np.uint8)
        normal[y:y + 80, x:x + 40] = (200, 128, 200)
        rawdata.write_png(os.path.join(clip_dir, f"frame_{v:02d}.png"), img)
        rawdata.write_png(os.path.join(clip_dir, f"depth_{v:02d}.png"), depth)
        rawdata.write_png(os.path.join(clip_dir, f"normal_{v:02d}.png"), normal)
    return seconds


def make_raw_fixture(data_root, dataset="fx"):
    raw = rawdata.raw_dir(dataset, data_root)
    rows = []
    for ci, cls in enumerate(CLASSES):
        for k, split in enumerate(SPLITS):
            cid = f"{cls}_{k:02d}"
            dur = make_clip(os.path.join(raw, "clips", cid), cls, k, seed=100 * ci + k)
            rows.append({
                "clip_id": cid, "class": cls, "source": "folder", "split": split,
                "caption": S.caption_text(cls), "audio": f"clips/{cid}/audio.wav",
                "frames": [f"clips/{cid}/frame_{v:02d}.png" for v in range(10)],
                "depths": [f"clips/{cid}/depth_{v:02d}.png" for v in range(10)],
                "normals": [f"clips/{cid}/normal_{v:02d}.png" for v in range(10)],
                "keyframe_times": [dur * (v + 0.5) / 10 for v in range(10)], "duration_s": dur,
                "oracles": {}, "origin": {"seed": k}})
    rawdata.write_manifest(os.path.join(raw, "manifest.jsonl"), rows)
    return raw, rows


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    make_raw_fixture(root)
    return root


@pytest.fixture(scope="module")
def tokenized(fixture_root, tmp_path_factory):
    """An uninterrupted run, in-process."""
    root = str(tmp_path_factory.mktemp("full"))
    shutil.copytree(os.path.join(fixture_root, "fx"), os.path.join(root, "fx"))
    tokenize_all.main(["--dataset=fx", f"--data_root={root}"] + FAST)
    return M.tok_dir("fx", root)


def test_shapes_ranges_meta(tokenized):
    meta = M.load_meta(tokenized)
    assert meta["class_names"] == CLASSES
    assert meta["splits"] == {"train": 9, "val": 3, "test": 3}
    assert meta["modalities"]["tok_audio"]["tokenizer"] == "mel_rvq"
    assert meta["modalities"]["tok_rgb"]["tokenizer"] == "patch_kmeans"
    assert meta["modalities"]["caption"]["pad_id"] == M.CAPTION_PAD
    for split, n in meta["splits"].items():
        arrays = M.open_split(tokenized, split, meta)
        for m in M.MODALITIES:
            a = np.asarray(arrays[m.name])
            assert a.shape == ((n, 10, m.length) if m.per_view else (n, m.length))
            assert a.max() < m.vocab
        audio = np.asarray(arrays["tok_audio"]).astype(int)
        assert audio[..., 0::2].max() < 16 and audio[..., 1::2].min() >= 1024 and audio[..., 1::2].max() < 1040
        assert np.asarray(arrays["tok_rgb"]).max() < 32
        labels = np.asarray(arrays["label"])
        assert [CLASSES[i] for i in labels] == [c.split("_")[0] for c in arrays["clip_ids"]]
        captions = [S.decode_caption(r) for r in np.asarray(arrays["caption"])]
        assert captions == [S.caption_text(CLASSES[i]) for i in labels]
    assert not any(f.endswith(".partial") for f in os.listdir(os.path.join(tokenized, "train")))


def test_load_tokenizer_decodes(tokenized):
    meta = M.load_meta(tokenized)
    arrays = M.open_split(tokenized, "val", meta)
    batch, _ = M.gather_views(arrays, [0, 1], [3, 3])
    audio = T.load_tokenizer(tokenized, meta, "audio").decode(batch["tok_audio"])
    assert audio.shape == (2, M.AUDIO_WINDOW) and audio.dtype == np.float32
    rgb_tok = T.load_tokenizer(tokenized, meta, "rgb")
    rgb = rgb_tok.decode(batch["tok_rgb"])
    assert rgb.shape == (2, 224, 224, 3) and rgb.dtype == np.uint8
    assert (rgb_tok.encode(rgb) == batch["tok_rgb"]).all()       # exact round trip through pixels
    depth = T.load_tokenizer(tokenized, meta, "depth").decode(batch["tok_depth"])
    assert depth.shape == (2, 224, 224) and depth.dtype == np.uint16
    normal = T.load_tokenizer(tokenized, meta, "normal").decode(batch["tok_normal"])
    assert normal.shape == (2, 224, 224, 3) and normal.dtype == np.uint8
    assert T.load_tokenizer(tokenized, meta, "caption").decode(batch["caption"])[0].startswith("a photo of a")


def tokenize_variant(fixture_root, tmp_path, *flags):
    """Tokenize a copy of the fixture with extra flags -> (tok_path, meta, the test split, raw dir, the raw
    manifest row of the test split's first clip)."""
    root = str(tmp_path)
    shutil.copytree(os.path.join(fixture_root, "fx"), os.path.join(root, "fx"))
    tokenize_all.main(["--dataset=fx", f"--data_root={root}", *flags] + FAST)
    tok_path = M.tok_dir("fx", root)
    meta = M.load_meta(tok_path)
    arrays = M.open_split(tok_path, "test", meta)
    raw = rawdata.raw_dir("fx", root)
    row = next(r for r in rawdata.read_manifest(os.path.join(raw, "manifest.jsonl"))
               if r["clip_id"] == arrays["clip_ids"][0])
    return tok_path, meta, arrays, raw, row


def test_audio_level1_shape_delta(fixture_root, tokenized, tmp_path):
    """--audio_level1=shape_delta: its codebook carries the 160-d level-1 keys, the stored ids are what the
    loaded tokenizer gives the clip's windows, and it is not mistaken for the default's codebook."""
    tok_path, meta, arrays, raw, row = tokenize_variant(fixture_root, tmp_path, "--audio_level1=shape_delta")
    audio_tok = T.load_tokenizer(tok_path, meta, "audio")
    assert audio_tok.level1_mode == "shape_delta" and audio_tok.keys.shape == (16, 160)
    windows = rawdata.audio_windows(rawdata.load_audio(row, raw), row["keyframe_times"])
    assert np.array_equal(audio_tok.encode(windows).numpy(), np.asarray(arrays["tok_audio"][0]))
    default = T.load_tokenizer(tokenized, M.load_meta(tokenized), "audio")
    assert default.level1_mode == "shape"
    assert not np.array_equal(np.asarray(arrays["tok_audio"]),
                              np.asarray(M.open_split(tokenized, "test")["tok_audio"]))


def test_audio_rvq_levels_one(fixture_root, tokenized, tmp_path):
    """--audio_rvq_levels=1: meta.json records a one-codebook layout, the stored audio is 256 ids a view, what the
    loaded tokenizer gives the clip's windows, and the images are tokenized as in the default."""
    try:
        tok_path, meta, arrays, raw, row = tokenize_variant(fixture_root, tmp_path, "--audio_rvq_levels=1",
                                                            "--audio_level1=spectrum")
        assert meta["modalities"]["tok_audio"]["layout"]["codebooks"] == 1 and M.AUDIO_CODEBOOKS == 1
        assert arrays["tok_audio"].shape[1:] == (M.NUM_VIEWS, 256)
        audio_tok = T.load_tokenizer(tok_path, meta, "audio")
        windows = rawdata.audio_windows(rawdata.load_audio(row, raw), row["keyframe_times"])
        assert np.array_equal(audio_tok.encode(windows).numpy(), np.asarray(arrays["tok_audio"][0]))
        assert np.array_equal(np.asarray(arrays["tok_rgb"]), np.asarray(M.open_split(tokenized, "test")["tok_rgb"]))
    finally:
        M.set_audio_layout(M.ENCODEC_LAYOUT)   # the module state later tests expect


def test_depth_norm(fixture_root, tokenized, tmp_path):
    """depth codes on one global scale by default, per image with --depth_norm=image: each codebook records its
    choice (so a change refits, never mistaken for the other), and the stored ids are what the loaded tokenizer
    gives the clip's depth maps."""
    default_tok = T.load_tokenizer(tokenized, M.load_meta(tokenized), "depth")
    assert default_tok.depth_norm == "global" and default_tok.settings["fit"]["depth_norm"] == "global"
    tok_path, meta, arrays, raw, row = tokenize_variant(fixture_root, tmp_path, "--depth_norm=image")
    depth_tok = T.load_tokenizer(tok_path, meta, "depth")
    assert depth_tok.depth_norm == "image" and "depth_norm" not in depth_tok.settings["fit"]
    maps = tokenize_all.load_images(row, raw, "tok_depth")
    assert np.array_equal(depth_tok.encode(maps).numpy(), np.asarray(arrays["tok_depth"][0]))


def run_cli(root, extra_env=None):
    env = dict(os.environ, **(extra_env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "tokenize_all.py"), "--dataset=fx",
                           f"--data_root={root}"] + FAST, cwd=root, env=env, capture_output=True, text=True)


def test_resume_after_kill(fixture_root, tokenized, tmp_path, capsys):
    root = str(tmp_path)
    shutil.copytree(os.path.join(fixture_root, "fx"), os.path.join(root, "fx"))
    tok = M.tok_dir("fx", root)
    first = run_cli(root, {"NANO4M_TOKENIZE_STOP_AFTER": "2"})    # dies after 2 batches of 2 clips
    assert first.returncode == 3, first.stderr
    assert not os.path.exists(os.path.join(tok, "meta.json"))
    with open(os.path.join(tok, "train", "progress.json")) as f:
        assert json.load(f)["done"] == 4
    capsys.readouterr()
    run_main(root)                                                    # the rerun, in-process
    second = capsys.readouterr().out
    assert "reusing" in second                                        # codebooks not refitted
    assert "train: resuming at clip 4/9" in second
    assert "train: encoded 5 clips" in second                         # finished rows were not redone
    meta = M.load_meta(tok)
    for split in meta["splits"]:
        a, b = M.open_split(tok, split, meta), M.open_split(tokenized, split, meta)
        for m in M.MODALITY_NAMES + ("label",):
            assert np.array_equal(np.asarray(a[m]), np.asarray(b[m])), (split, m)
        assert a["clip_ids"] == b["clip_ids"]
    run_main(root)                                                    # all done: nothing redone
    assert "train: 9 clips already tokenized" in capsys.readouterr().out


@pytest.fixture
def broken_root(fixture_root, tmp_path):
    root = str(tmp_path)
    shutil.copytree(os.path.join(fixture_root, "fx"), os.path.join(root, "fx"))
    return root, rawdata.raw_dir("fx", root)


def run_main(root):
    tokenize_all.main(["--dataset=fx", f"--data_root={root}"] + FAST)


def test_refuses_missing_file(broken_root):
    root, raw = broken_root
    os.remove(os.path.join(raw, "clips", "dog_02", "frame_05.png"))
    with pytest.raises(FileNotFoundError, match="clip dog_02.*frame_05.png missing"):
        run_main(root)


def test_refuses_short_clip(broken_root):
    root, raw = broken_root
    rawdata.write_wav(os.path.join(raw, "clips", "cow_03", "audio.wav"), np.zeros(24000, np.float32))
    with pytest.raises(ValueError, match="clip cow_03.*shorter than the 3.41 s window"):
        run_main(root)


def test_refuses_wrong_image_size(broken_root):
    root, raw = broken_root
    rawdata.write_png(os.path.join(raw, "clips", "duck_04", "normal_02.png"), np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ValueError, match="clip duck_04.*expected 224x224, got 100x100"):
        run_main(root)


def _write_wav_at(path, x, sr):
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((x * 32767).astype("<i2").tobytes())


def test_sample_rates(broken_root):
    root, raw = broken_root
    row = rawdata.read_manifest(os.path.join(raw, "manifest.jsonl"))[0]
    path = os.path.join(raw, row["audio"])
    x, _ = rawdata.read_wav(path)
    _write_wav_at(path, np.interp(np.arange(0, len(x), 0.5), np.arange(len(x)), x), 48000)  # resampled
    y = rawdata.load_audio(row, raw)
    assert len(y) == len(x) and np.abs(y - x).mean() < 0.02
    _write_wav_at(path, x[:1000], 1)                                                       # nonsense
    with pytest.raises(ValueError, match=f"clip {row['clip_id']}.*sample rate 1 Hz"):
        run_main(root)


def test_refuses_missing_structure(broken_root):
    root, raw = broken_root
    path = os.path.join(raw, "manifest.jsonl")
    rows = rawdata.read_manifest(path)
    rows[7]["depths"] = None
    rawdata.write_manifest(path, rows)
    with pytest.raises(ValueError, match=f"clip {rows[7]['clip_id']}: no depths"):
        run_main(root)


@pytest.mark.parametrize("script", ["tokenize_all.py", "prepare_data.py", "sample.py"])
def test_scripts_take_config_files_and_key_value_like_train(script, tmp_path):
    """One configuration mechanism (configurator.py): --help lists every setting with its default, a config
    file and --key=value override them in order, and a bad name, a bad type or a space-separated value is
    refused in one line naming it."""
    import importlib
    mod = importlib.import_module(script[:-3])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(f"--{k}=" in proc.stdout for k in mod.DEFAULTS), proc.stdout
    cfg = tmp_path / "my.py"
    cfg.write_text("seed = 7\nbatch_size = batch_size * 2\n")   # a config file reads the settings in scope
    import configurator
    got = configurator.apply_overrides(mod.DEFAULTS, [str(cfg), "--seed=8"], verbose=False)
    assert got["seed"] == 8 and got["batch_size"] == 2 * mod.DEFAULTS["batch_size"]
    for bad, why in (("--sed=1", "unknown setting 'sed'"), ("--batch_size=big", "expects an int"),
                     ("--seed", "expected --key=value")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), bad], capture_output=True, text=True,
                              env=env, cwd=tmp_path)
        assert proc.returncode != 0 and why in proc.stderr and "Traceback" not in proc.stderr, (bad, proc.stderr)


def test_tokenize_all_settings_are_checked():
    args = tokenize_all.parse_args(["--rgb_codes=4x8", "--audio_level1=shape_delta"])
    assert args.rgb_codes == (4, 8) and args.depth_codes == tuple(T.DEFAULT_CODES["tok_depth"])
    for bad, why in (("--rgb_codes=4by8", "MEANSxSHAPES"), ("--audio_tokenizer=wav2vec", "choose one of")):
        with pytest.raises(SystemExit, match=why):
            tokenize_all.parse_args([bad])
