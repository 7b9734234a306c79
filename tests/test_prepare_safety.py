"""prepare_data.py on hostile or broken input: ids, class names and folder names that try to leave
data/<dataset>/ are refused by name and nothing is written outside it; and every clip a stage removes is
listed in removed.jsonl (clip id, stage, reason, score and threshold where there is one)."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import prepare_data as pd
import rawdata


def require_ffmpeg():
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is not on PATH (apt-get install ffmpeg): the clips are decoded with it")


def files_under(root):
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def fake_web(kinds):
    """A local fetch writing what a download would: a real mp4 of `seconds`, or garbage bytes."""
    calls = []

    def fetch(youtube_id, start_s, end_s, out_path):
        calls.append(youtube_id)
        kind = kinds.get(youtube_id, "ok")
        if kind == "gone":
            raise RuntimeError(f"ERROR: [youtube] {youtube_id}: Video unavailable")
        if kind == "garbage":
            with open(out_path, "wb") as f:
                f.write(b"<html>not a video</html>")
            return
        seconds = 2.0 if kind == "short" else 4.0
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc=size=64x48:rate=5:duration={seconds}", "-f", "lavfi", "-i",
                        f"sine=frequency=500:duration={seconds}", "-shortest", "-pix_fmt", "yuv420p", "-f", "mp4",
                        out_path], check=True)
    return fetch, calls


CLIP_LIST = """youtube_id,start_s,class,source,pann_score,clip_score,vad_voiced_frac,stem
GoodGoodGd1,30.0,horse,audioset,0.9,0.3,0.0,GoodGoodGd1_30
../../evil1,30.0,horse,audioset,0.9,0.3,0.0,x
..%2F..%2Fe,30.0,horse,audioset,0.9,0.3,0.0,x
short,30.0,horse,audioset,0.9,0.3,0.0,x
GoodGoodGd2,30.0,../../../tmp/pwn,audioset,0.9,0.3,0.0,x
GoodGoodGd3,nan,horse,audioset,0.9,0.3,0.0,x
GoodGoodGd4,-5,sheep,vggsound,0.9,0.3,0.0,x
GoodGoodGd5,abc,sheep,vggsound,0.9,0.3,0.0,x
GoodGoodGd6,10,sheep,vggsound,0.9,0.3,0.0,../../stem
GoodGoodGd7,10,sheep,vggsound,0.9,0.3,0.0,GoodGoodGd7_10
GoodGoodGd8,10,sheep,vggsound,0.9,0.3,0.0,
"""


def test_clip_list_ids_are_validated_and_nothing_leaves_the_dataset(tmp_path, monkeypatch):
    require_ffmpeg()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "clips.csv"
    lst.write_text(CLIP_LIST)
    before = files_under(tmp_path)
    fetch, calls = fake_web({})
    rows, table = pd.main(["--source=manifest", f"--path={lst}", "--data_root=data", "--pseudo_labels=flat",
                           "--skip_oracles=pann,clip,vad", "--min_success=0"], fetch=fetch)
    # the three sound rows go through; each bad row is rejected, named by its line, and never fetched
    assert sorted(r["video_id"] for r in rows) == ["GoodGoodGd1", "GoodGoodGd7", "GoodGoodGd8"]
    assert sorted(calls) == ["GoodGoodGd1", "GoodGoodGd7", "GoodGoodGd8"]
    raw = rawdata.raw_dir("clips", "data")
    invalid = {r["row"].rsplit(":", 1)[1]: r["reason"] for r in map(json.loads, open(os.path.join(raw, "removed.jsonl")))
               if r["stage"] == "invalid"}
    assert invalid.keys() == {"3", "4", "5", "6", "7", "8", "9", "10"}
    assert "is not a YouTube id" in invalid["3"] and "'../../evil1'" in invalid["3"]
    assert "is not a YouTube id" in invalid["4"] and "is not a YouTube id" in invalid["5"]
    assert "class '../../../tmp/pwn' is not a class name" in invalid["6"]
    assert "time range" in invalid["7"] and "time range" in invalid["8"] and "not one" in invalid["9"]
    assert "stem '../../stem' is not a safe file name" in invalid["10"]
    assert table["removed"]["invalid_row"] == 8
    # the rejected rows are named in the run's summary too; nothing was written outside data/clips/
    new = files_under(tmp_path) - before
    assert new and all(p.startswith(os.path.join(str(tmp_path), "data", "clips") + os.sep) for p in new), sorted(new)


def test_names_that_would_leave_data_are_refused(tmp_path, monkeypatch):
    require_ffmpeg()
    monkeypatch.chdir(tmp_path)
    for bad in ("..", "../escape", "a/b", ".hidden", ""):
        with pytest.raises(SystemExit):
            pd.parse_args(["--source=folder", "--path=x", f"--dataset={bad}"])
        with pytest.raises(ValueError, match="is not a safe file name"):
            rawdata.raw_dir(bad, "data")
    for bad in ("..", "../x", "x/../../y", ".", ""):
        with pytest.raises(ValueError, match="clip id"):
            rawdata.clip_dir("data/d/raw", bad)
    # a folder given as 'recs/sub/..' is named for the folder it means, inside data/; class and clip folder
    # names with odd characters become safe clip ids
    recs = tmp_path / "recs"
    d = recs / "owl ..x" / "clip ..(1)"
    d.mkdir(parents=True)
    (recs / "sub").mkdir()
    t = np.arange(24000 * 4) / 24000
    rawdata.write_wav(str(d / "a.wav"), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    from PIL import Image
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(str(d / "p.png"))
    before = files_under(tmp_path)
    rows, _ = pd.main(["--source=folder", "--path=recs/sub/..", "--data_root=data", "--pseudo_labels=flat",
                       "--min_success=0"])
    assert [r["clip_id"] for r in rows] == ["owl_..x__clip_.._1_"]
    new = files_under(tmp_path) - before
    assert new and all(p.startswith(os.path.join(str(tmp_path), "data", "recs") + os.sep) for p in new), sorted(new)


def test_every_removal_is_listed(tmp_path):
    """One run that removes a clip at every stage; removed.jsonl names each with its stage and reason, and
    gives the score and threshold where there is one. The dataset table links to it."""
    require_ffmpeg()
    aud = tmp_path / "segments.csv"
    aud.write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                   'HorseHorse1, 30.000, 40.000, "/m/03k3r"\n'
                   'HorseHorse2, 30.000, 40.000, "/m/03k3r"\n'
                   'DogCatDogC1, 0.000, 10.000, "/m/0bt9lr,/m/01yrx"\n'          # selects dog and cat
                   'MixedClass1, 0.000, 10.000, "/m/0bt9lr"\n'                   # dog, overlapping a cat (below)
                   'ShortClip01, 0.000, 10.000, "/m/07bgp"\n'
                   'GarbageFil1, 0.000, 10.000, "/m/07bgp"\n'
                   'GoneGoneGo1, 0.000, 10.000, "/m/07bgp"\n'
                   '../../../..x, 0.000, 10.000, "/m/07bgp"\n')
    vgg = tmp_path / "vggsound.csv"
    vgg.write_text("HorseHorse1,32,horse neighing,train\n"                        # the same horse clip: merged
                   "MixedClass1,5,cat meowing,train\n")
    fetch, _ = fake_web({"ShortClip01": "short", "GarbageFil1": "garbage", "GoneGoneGo1": "gone"})
    # an impossible VAD maximum (-1) removes the two horses left: a run that keeps no clip says so
    with pytest.raises(pd.TooFewClips, match=r"no clip is left: all 3 that got through were removed \(vad: 2, too_short: 1\)"):
        pd.main(["--source=audioset,vggsound", f"--audioset_csvs={aud}", f"--vggsound_csv={vgg}",
                 f"--data_root={tmp_path / 'data'}", "--pseudo_labels=flat", "--skip_oracles=pann,clip",
                 "--min_length_policy=refuse", "--vad_max_voiced=-1", "--min_success=0"], fetch=fetch)
    raw = rawdata.raw_dir("animals", str(tmp_path / "data"))
    table = json.load(open(os.path.join(raw, "dataset_table.json")))
    listed = [json.loads(line) for line in open(os.path.join(raw, "removed.jsonl"))]
    by = {(r["clip_id"], r["stage"]): r for r in listed}
    assert "selects cat and dog" in by[("DogCatDogC1_0", "select")]["reason"]
    assert "not a YouTube id" in by[("../../../..x", "invalid")]["reason"]
    assert "merged into HorseHorse1_30" in by[("HorseHorse1_32", "dedup")]["reason"]
    assert "of another class" in by[("MixedClass1_0", "dedup")]["reason"] and ("MixedClass1_5", "dedup") in by
    assert "Video unavailable" in by[("GoneGoneGo1_0", "download")]["reason"]
    assert by[("GarbageFil1_0", "bad_file")]["file"].endswith("GarbageFil1_0.mp4")
    short = by[("ShortClip01_0", "too_short")]
    assert abs(short["score"] - 2.0) < 0.1 and short["threshold"] == pytest.approx(81920 / 24000, abs=1e-3)
    # the VAD oracle ran (the real Silero: a tone is 0.0 speech) and removed both horses
    for cid in ("HorseHorse1_30", "HorseHorse2_30"):
        r = by[(cid, "vad")]
        assert r["score"] == 0.0 and r["threshold"] == -1.0 and r["class"] == "horse" and "speech" in r["reason"]
    assert len(listed) == 10
    assert {k: v for k, v in table["removed"].items() if v} == {
        "audioset_ambiguous_class": 1, "invalid_row": 1, "dedup_merged": 1, "dedup_conflicting_class": 2,
        "download_failed": 1, "bad_file": 1, "too_short_refused": 1, "oracle_vad": 2}
    assert "[removed.jsonl](removed.jsonl)" in open(os.path.join(raw, "dataset_table.md")).read()


def test_published_scores_below_threshold_are_listed_with_score_and_threshold(tmp_path):
    require_ffmpeg()
    lst = tmp_path / "pub.csv"
    lst.write_text("youtube_id,start_s,class,source,pann_score,clip_score,vad_voiced_frac\n"
                   "PubPubPub01,30.0,horse,audioset,0.21,0.30,0.0\n"
                   "PubPubPub02,30.0,horse,audioset,0.90,0.19,0.0\n"
                   "PubPubPub03,30.0,sheep,audioset,0.90,0.30,0.0\n")
    fetch, _ = fake_web({})
    rows, _ = pd.main(["--source=manifest", f"--path={lst}", f"--data_root={tmp_path}", "--pseudo_labels=flat",
                       "--skip_oracles=pann,clip,vad"], fetch=fetch)
    assert [r["video_id"] for r in rows] == ["PubPubPub03"]
    listed = {r["clip_id"]: r for r in map(json.loads, open(os.path.join(rawdata.raw_dir("pub", str(tmp_path)),
                                                                       "removed.jsonl")))}
    p, c = listed["PubPubPub01_30"], listed["PubPubPub02_30"]
    assert (p["stage"], p["score"], p["threshold"], p["published"]) == ("pann", 0.21, 0.30, True)
    assert (c["stage"], c["score"], c["threshold"]) == ("clip", 0.19, 0.25)
    assert "below the threshold" in p["reason"] and p["scores"] == {"pann": "skipped", "clip": "skipped", "vad": "skipped"}
