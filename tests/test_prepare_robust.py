"""prepare_data.py --source=folder on a folder of real files where some are broken: a bad clip is skipped and
listed (file and reason) in the run's summary and in removed.jsonl, the rest go through, a rerun reads only
what is left, --strict=True stops at the first. A small folder (23 clips in 9 classes) still gets a val and a
test clip, and a script that opens an empty split says which one in one line."""
import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import modalities as M
import prepare_data as pd
import rawdata

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 9 classes of 1-4 clips: 23 in all, as in the folder of real animal recordings that once left val and test empty
CLASS_SIZES = {"bee": 4, "cat": 4, "cow": 3, "dog": 3, "duck": 2, "frog": 2, "goat": 2, "owl": 2, "pig": 1}


def require_ffmpeg():
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is not on PATH (apt-get install ffmpeg): the folder source decodes media with it")


def write_image(path, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(str(path))


def write_tone(path, freq, seconds=4.0, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    rawdata.write_wav(str(path), (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr=sr)


@pytest.fixture
def folder(tmp_path):
    """23 good clip folders (a 16 kHz wav and a png each) and five bad entries of the kinds met in real folders."""
    require_ffmpeg()
    root = tmp_path / "recordings"
    k = 0
    for cls, n in CLASS_SIZES.items():
        for i in range(n):
            d = root / cls / f"rec{i}"
            d.mkdir(parents=True)
            write_tone(d / "sound.wav", 200 + 37 * k)
            write_image(d / "photo.png", k)
            k += 1
    bad = {}
    d = root / "owl" / "noise"        # random bytes under a .wav name
    d.mkdir()
    (d / "sound.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    write_image(d / "photo.png", 99)
    bad["noise"] = (d / "sound.wav", "ffmpeg could not decode audio")
    d = root / "owl" / "empty"        # an empty .wav
    d.mkdir()
    (d / "sound.wav").write_bytes(b"")
    write_image(d / "photo.png", 98)
    bad["empty"] = (d / "sound.wav", "could not decode audio")
    d = root / "cat" / "nopicture"    # audio but no picture
    d.mkdir()
    write_tone(d / "sound.wav", 500)
    bad["nopicture"] = (d, "found 1 audio, 0 images")
    d = root / "cow" / "badimage"     # a picture that is not one
    d.mkdir()
    write_tone(d / "sound.wav", 600)
    (d / "photo.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    bad["badimage"] = (d / "photo.jpg", "not a readable image")
    write_tone(root / "dog" / "lonely.wav", 700)   # an audio file alone, no clip folder
    bad["lonely"] = (root / "dog" / "lonely.wav", "an audio file alone is not a clip")
    return root, bad


def run(root, data_root, *extra):
    return pd.main(["--source=folder", f"--path={root}", f"--data_root={data_root}", "--dataset=zoo",
                    "--pseudo_labels=flat", *extra])


def test_bad_files_are_listed_and_skipped_and_a_rerun_reads_only_what_is_left(folder, tmp_path, capsys, monkeypatch):
    root, bad = folder
    rows, table = run(root, tmp_path / "data")
    raw = rawdata.raw_dir("zoo", str(tmp_path / "data"))
    back = rawdata.read_manifest(os.path.join(raw, "manifest.jsonl"))
    assert len(rows) == len(back) == 23
    assert collections.Counter(r["class"] for r in back) == CLASS_SIZES
    # every bad entry listed once, with its file and reason, beside the manifest and in the summary
    listed = [json.loads(line) for line in open(os.path.join(raw, "removed.jsonl"))]
    assert sorted(r["stage"] for r in listed) == ["bad_file"] * 5
    out = capsys.readouterr().out
    for name, (path, reason) in bad.items():
        hits = [r for r in listed if r["file"] == str(path)]
        assert len(hits) == 1 and reason in hits[0]["reason"], (name, listed)
        assert f"{path}: " in out and reason in out.split(f"{path}: ")[1].split("\n")[0]
    assert table["removed"]["bad_file"] == 5
    assert "[removed.jsonl](removed.jsonl)" in open(os.path.join(raw, "dataset_table.md")).read()
    # the small folder still gets a val and a test clip (10% of 23 groups each), and every class keeps train
    splits = collections.Counter(r["split"] for r in back)
    assert splits == {"train": 19, "val": 2, "test": 2}
    assert all(any(r["split"] == "train" and r["class"] == c for r in back) for c in CLASS_SIZES)

    # rerun: the 23 finished clips are not decoded again; the bad audio files are tried again (they may be fixed)
    decoded = []
    real = pd.decode_audio
    monkeypatch.setattr(pd, "decode_audio", lambda path, *a, **k: decoded.append(path) or real(path, *a, **k))
    run(root, tmp_path / "data")
    assert sorted(decoded) == sorted(str(p) for p in (root / "owl" / "noise" / "sound.wav", root / "owl" / "empty" / "sound.wav",
                                                     root / "cow" / "badimage" / "sound.wav"))
    again = rawdata.read_manifest(os.path.join(raw, "manifest.jsonl"))
    assert [(r["clip_id"], r["split"]) for r in again] == [(r["clip_id"], r["split"]) for r in back]
    # the user fixes one file: the rerun adds that clip and decodes nothing it already has
    write_tone(root / "owl" / "noise" / "sound.wav", 900)
    decoded.clear()
    rows, table = run(root, tmp_path / "data")
    assert len(rows) == 24 and table["removed"]["bad_file"] == 4
    assert len(decoded) == 3 and str(root / "owl" / "noise" / "sound.wav") in decoded


def test_strict_stops_at_the_first_bad_file(folder, tmp_path):
    root, bad = folder
    with pytest.raises(ValueError) as e:
        run(root, tmp_path / "data", "--strict=True")
    assert any(str(path) in str(e.value) and reason in str(e.value) for path, reason in bad.values())
    assert not os.path.exists(os.path.join(rawdata.raw_dir("zoo", str(tmp_path / "data")), "manifest.jsonl"))
    # the same from the command line: a non-zero exit with one line naming the file, no traceback
    proc = subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), "--source=folder", f"--path={root}",
                           f"--data_root={tmp_path / 'cli'}", "--pseudo_labels=flat", "--strict=True"],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prepare_data.py: ") and "--strict=True stops at the first bad file" in last
    assert any(str(path) in last for path, _ in bad.values())


def test_split_gives_val_and_test_a_clip_when_it_can_and_says_when_it_cannot(capsys):
    strata = [c for c, n in CLASS_SIZES.items() for _ in range(n)]
    got = rawdata.stratified_split(strata, seed=1337)
    assert collections.Counter(got) == {"train": 19, "val": 2, "test": 2}
    assert got == rawdata.stratified_split(strata, seed=1337)   # reproducible
    assert got != rawdata.stratified_split(strata, seed=7)
    # three clips of one class: one in each split
    assert sorted(rawdata.stratified_split(["a"] * 3)) == ["test", "train", "val"]
    # a dataset big enough for 80/10/10 per stratum is split as before (the top-up never runs)
    big = rawdata.stratified_split(["a"] * 100 + ["b"] * 100, seed=3)
    assert collections.Counter(big[:100]) == collections.Counter(big[100:]) == {"train": 80, "val": 10, "test": 10}
    # two clips cannot fill three splits: left in train, and the run says so
    rows = [{"clip_id": f"c{i}", "class": "owl", "source": "folder"} for i in range(2)]
    pd.split_rows(rows)
    assert [r["split"] for r in rows] == ["train", "train"]
    err = capsys.readouterr().err
    assert "val and test stay empty" in err and "add clips" in err


def test_scripts_name_an_empty_split_in_one_line(tmp_path):
    from test_train import TINY, write_dataset
    write_dataset(str(tmp_path), name="small", n_train=8, n_val=0)
    tok = M.tok_dir("small", str(tmp_path))
    with pytest.raises(M.EmptySplitError, match="the val split is empty .* add clips"):
        M.open_split(tok, "val")
    assert len(M.open_split(tok, "train")["label"]) == 8
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--dataset=small",
                           f"--data_root={tmp_path}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=2"],
                          capture_output=True, text=True, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: ") and "the val split is empty" in last and "rerun prepare_data.py" in last
