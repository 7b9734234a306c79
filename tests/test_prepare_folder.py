"""prepare_data.py --source=folder on real media files of each format, made here with ffmpeg and Pillow
from a synthetic tone and a synthetic image; plus the pseudo-label conversions."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import prepare_data as pd
import rawdata

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed (apt-get install ffmpeg)")


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def make_tone(path, seconds, freq=440.0):
    """A tone with a slow amplitude wobble, encoded by ffmpeg into whatever format the extension says."""
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency={freq}:duration={seconds}:sample_rate=44100",
           "-af", "volume=0.5", "-ac", "2", str(path))


def make_image(path, size=(320, 240), seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size[1], :size[0]]
    img = np.stack([x * 255 // size[0], y * 255 // size[1], np.full_like(x, rng.integers(0, 255))], -1)
    Image.fromarray(img.astype(np.uint8)).save(str(path))


def make_video(path, seconds, freq=330.0):
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size=320x240:rate=10:duration={seconds}",
           "-f", "lavfi", "-i", f"sine=frequency={freq}:duration={seconds}",
           "-shortest", "-pix_fmt", "yuv420p", str(path))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("recordings")
    # class "owl": clip folders, one per audio format, with 1, 3 and 12 images in jpg / png / webp
    for i, ext in enumerate(["wav", "flac", "ogg", "mp3"]):
        d = root / "owl" / f"rec_{ext}"
        d.mkdir(parents=True)
        make_tone(d / f"sound.{ext}", 4.0 if ext != "mp3" else 2.0, freq=300 + 100 * i)  # the mp3 is short
        n_images = [1, 3, 12, 2][i]
        for j in range(n_images):
            make_image(d / f"img_{j:02d}.{['jpg', 'png', 'webp'][j % 3]}", seed=j)
    # class "frog": video files
    (root / "frog").mkdir()
    make_video(root / "frog" / "pond.mp4", 5)
    make_video(root / "frog" / "night.webm", 4)
    return root


def test_folder_source_all_formats(folder, tmp_path):
    rows, table = pd.main([f"--source=folder", f"--path={folder}", f"--data_root={tmp_path}", "--dataset=mine",
                           "--pseudo_labels=flat"])
    raw = rawdata.raw_dir("mine", str(tmp_path))
    back = rawdata.read_manifest(os.path.join(raw, "manifest.jsonl"))
    assert len(back) == 6
    by = {r["clip_id"]: r for r in back}
    assert {r["class"] for r in back} == {"owl", "frog"}
    for r in back:
        audio, sr = rawdata.read_wav(os.path.join(raw, r["audio"]))
        assert sr == 24000 and audio.ndim == 1
        assert len(audio) >= 81920
        for p in r["frames"] + r["normals"]:
            assert rawdata.read_png(os.path.join(raw, p)).shape == (224, 224, 3)
        for p in r["depths"]:
            assert rawdata.read_png(os.path.join(raw, p)).dtype == np.uint16
        assert r["structure"] == "flat-placeholder"
        assert r["oracles"] == {"pann": "skipped", "clip": "skipped", "vad": "skipped"}
        assert r["caption"] == f"a photo of a {r['class']}"
        assert len(r["keyframe_times"]) == 10 and r["split"] in rawdata.SPLITS
    # the mp3 is 2 s: padded to one window with its true length recorded
    mp3 = by["owl__rec_mp3"]
    assert mp3["padded"] and abs(mp3["duration_s"] - 2.0) < 0.1
    a, _ = rawdata.read_wav(os.path.join(raw, mp3["audio"]))
    assert len(a) == 81920 and np.abs(a[int(2.2 * 24000):]).max() == 0.0
    # a 4 s wav: its real length, resampled to 24 kHz, a 400 Hz tone (sine at 44.1 kHz in)
    wav = by["owl__rec_wav"]
    a, _ = rawdata.read_wav(os.path.join(raw, wav["audio"]))
    assert abs(len(a) - 4 * 24000) < 100 and not wav["padded"]
    spec = np.abs(np.fft.rfft(a))
    assert abs(np.argmax(spec) * 24000 / len(a) - 300) < 3
    # one image repeated over all 10 views; 3 images spread in order; 12 subsampled
    assert by["owl__rec_wav"]["images_repeated"] and by["owl__rec_wav"]["n_images"] == 1
    f0 = rawdata.read_png(os.path.join(raw, wav["frames"][0]))
    assert all((rawdata.read_png(os.path.join(raw, p)) == f0).all() for p in wav["frames"])
    assert by["owl__rec_flac"]["origin"]["view_images"] == ["img_00.jpg"] * 4 + ["img_01.png"] * 3 + ["img_02.webp"] * 3
    assert not by["owl__rec_ogg"]["images_repeated"] and len(set(by["owl__rec_ogg"]["origin"]["view_images"])) == 10
    # videos: 10 distinct frames of testsrc (it moves), keyframes spread over the clip
    vid = by["frog__pond"]
    frames = [rawdata.read_png(os.path.join(raw, p)) for p in vid["frames"]]
    assert len({f.tobytes() for f in frames}) > 5
    assert np.allclose(vid["keyframe_times"], [0.25 + 0.5 * i for i in range(10)], atol=0.05)
    assert abs(by["frog__night"]["duration_s"] - 4.0) < 0.1
    # the dataset table was printed and saved
    saved = json.load(open(os.path.join(raw, "dataset_table.json")))
    assert saved["clips"] == 6 and saved["per_class"]["owl"]["total"] == 4
    # rerun resumes: same manifest, nothing rewritten
    mtime = os.path.getmtime(os.path.join(raw, wav["frames"][0]))
    pd.main([f"--source=folder", f"--path={folder}", f"--data_root={tmp_path}", "--dataset=mine", "--pseudo_labels=flat"])
    assert os.path.getmtime(os.path.join(raw, wav["frames"][0])) == mtime
    assert [r["split"] for r in rawdata.read_manifest(os.path.join(raw, "manifest.jsonl"))] == [r["split"] for r in back]


def test_folder_refuses_short_clips_and_bad_layout(folder, tmp_path):
    rows, table = pd.main([f"--source=folder", f"--path={folder}", f"--data_root={tmp_path}", "--dataset=strict",
                           "--pseudo_labels=flat", "--min_length_policy=refuse"])
    assert len(rows) == 5 and table["removed"]["too_short_refused"] == 1
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    make_tone(bad / "alone.wav", 1.0)
    with pytest.raises(ValueError, match="alone.wav: an audio file alone is not a clip"):
        pd.find_folder_clips(str(tmp_path / "bad"))
    (bad / "alone.wav").unlink()
    (bad / "clip").mkdir()
    (bad / "clip" / "broken.png").write_bytes(b"not a png")
    (bad / "clip" / "s.wav").write_bytes(b"RIFF nothing")
    with pytest.raises(ValueError, match="broken.png|s.wav"):
        pd.main([f"--source=folder", f"--path={tmp_path / 'bad'}", f"--data_root={tmp_path / 'out'}",
                 "--pseudo_labels=flat"])


def test_pseudo_label_conversions():
    # Depth-Anything gives inverse depth: larger disparity = closer = smaller stored depth
    disp = np.linspace(0.0, 10.0, 224 * 224).reshape(224, 224)
    depth = pd.disparity_to_depth_u16(disp)
    assert depth.dtype == np.uint16 and depth.max() == 65535 and depth.min() == 0
    flat = depth.ravel().astype(np.int64)
    assert (np.diff(flat) <= 0).all()
    n = np.zeros((3, 4, 4))
    n[2] = 1.0
    u8 = pd.normals_to_u8(n)
    assert u8.shape == (4, 4, 3) and (u8[..., 2] == 255).all() and (u8[..., 0] == 128).all()
    assert (pd.normals_to_u8(-np.ones((4, 4, 3))) == 0).all()
