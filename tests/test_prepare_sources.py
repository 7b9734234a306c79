"""prepare_data.py: the source lists in their real formats, class selection, dedup, the downloader's resume
and failure accounting (with a local fetch), the split invariants, and the published clip list of the report."""
import collections
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import prepare_data as pd
import rawdata

SEED_MANIFEST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "seed_manifest_test.csv")

# the real AudioSet segment-list format: comment header, ", " separators, quoted label lists
AUDIOSET_CSV = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=6, num_segs=6, num_unique_labels=9, num_positive_labels=14
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
-0RWZT-miFs, 420.000, 430.000, "/m/068hy,/m/0bt9lr,/m/05tny_,/m/0jbk"
-1nilez17Dg, 30.000, 40.000, "/m/07q0h5t,/m/03fwl"
-2PDE7hUArE, 30.000, 40.000, "/m/07bgp,/m/07q0h5t"
-3Y1j6iK1pQ, 10.000, 20.000, "/m/0bt9lr,/m/01yrx"
Ak4Ld5mMqVI, 23.000, 33.000, "/m/03k3r,/m/07q5rw0"
"""
# the real VGGSound format: no header, YTID,start,label,split, labels with commas quoted
VGGSOUND_CSV = """---g-f_I2yQ,1,people marching,test
Ak4Ld5mMqVI,25,horse neighing,train
Ak4Ld5mMqVI,100,horse neighing,train
0A8YtxWtqUs,30,"pigeon, dove cooing",train
1aBcDeFgHiJ,50,coyote howling,test
2zZz_yYyXxW,12,goat bleating,train
"""


def test_parse_and_select_audioset():
    segs = pd.parse_audioset_csv(AUDIOSET_CSV)
    assert len(segs) == 6
    assert segs[1] == dict(youtube_id="-0RWZT-miFs", start_s=420.0, end_s=430.0,
                           labels=["/m/068hy", "/m/0bt9lr", "/m/05tny_", "/m/0jbk"])
    picked, ambiguous = pd.select_audioset(segs, sorted(pd.CLASS_MAP))
    got = {(c["youtube_id"], c["cls"]) for c in picked}
    # speech is not selected; a goat bleat is not a sheep; a dog+cat segment is ambiguous and dropped
    assert got == {("-0RWZT-miFs", "dog"), ("-2PDE7hUArE", "sheep"), ("Ak4Ld5mMqVI", "horse")}
    assert ambiguous == 1
    picked, _ = pd.select_audioset(segs, ["horse"])
    assert [c["cls"] for c in picked] == ["horse"]
    with pytest.raises(ValueError, match="expected 4 fields"):
        pd.parse_audioset_csv("# header\nabc, 1.0, 2.0\n")


def test_parse_and_select_vggsound():
    rows = pd.parse_vggsound_csv(VGGSOUND_CSV)
    assert len(rows) == 6 and rows[3]["label"] == "pigeon, dove cooing" and rows[3]["end_s"] == 40.0
    picked = pd.select_vggsound(rows, sorted(pd.CLASS_MAP))
    assert [(c["youtube_id"], c["cls"]) for c in picked] == [
        ("Ak4Ld5mMqVI", "horse"), ("Ak4Ld5mMqVI", "horse"), ("0A8YtxWtqUs", "pigeon"), ("1aBcDeFgHiJ", "coyote")]


def test_class_map_is_consistent():
    assert len(pd.CLASS_MAP) == 11
    for c, m in pd.CLASS_MAP.items():
        assert m["pann"] and all(i in pd.AUDIOSET_INDEX for i in m["pann"]), c
        assert m["vggsound"], c
        assert set(m["audioset"]) <= set(m["pann"]), c
    assert pd.CLASS_MAP["coyote"]["audioset"] == []  # AudioSet has no coyote
    assert all(0 <= i < pd.AUDIOSET_NUM_CLASSES for i in pd.AUDIOSET_INDEX.values())


def test_dedup_across_sources():
    a, _ = pd.select_audioset(pd.parse_audioset_csv(AUDIOSET_CSV), sorted(pd.CLASS_MAP))
    v = pd.select_vggsound(pd.parse_vggsound_csv(VGGSOUND_CSV), sorted(pd.CLASS_MAP))
    conflict = dict(youtube_id="-0RWZT-miFs", start_s=425.0, end_s=435.0, cls="cat", source="vggsound",
                    origin_labels=["cat meowing"])
    kept, merged, conflicting = pd.dedup(a + v + [conflict])
    ids = collections.Counter(c["youtube_id"] for c in kept)
    # horse at 23-33 (AudioSet) and 25-35 (VGGSound) overlap: one clip from both; 100-110 is another clip
    horse = sorted((c for c in kept if c["youtube_id"] == "Ak4Ld5mMqVI"), key=lambda c: c["start_s"])
    assert [(c["start_s"], c["source"]) for c in horse] == [(23.0, "audioset+vggsound"), (100.0, "vggsound")]
    assert merged == 1
    # a dog segment overlapping a cat segment of the same video: both dropped
    assert "-0RWZT-miFs" not in ids and conflicting == 2
    assert len(kept) == 5
    assert pd.clip_id_for("2w2KITaBD5M", 30.0) == "2w2KITaBD5M_30"
    assert pd.clip_id_for("x", 2.5) == "x_2.5"


def test_downloader_resume_and_failure_accounting(tmp_path):
    jobs = [dict(clip_id=f"v{i}_0", youtube_id=f"v{i}", start_s=0.0, end_s=10.0) for i in range(8)]
    calls = collections.Counter()
    flaky = {"v5"}

    def fetch(youtube_id, start_s, end_s, out_path):
        calls[youtube_id] += 1
        assert end_s - start_s == 10.0
        if youtube_id == "v3":
            raise RuntimeError("ERROR: [youtube] v3: Private video. Sign in if you've been granted access")
        if youtube_id == "v4":
            raise RuntimeError("ERROR: [youtube] v4: Video unavailable. This video has been removed by the uploader")
        if youtube_id in flaky:
            raise ConnectionError("Read timed out")
        with open(out_path, "wb") as f:
            f.write(b"fake mp4 " + youtube_id.encode())

    out = str(tmp_path / "video")
    log = str(tmp_path / "failures.jsonl")
    s = pd.download_all(jobs, out, fetch=fetch, workers=3, log_path=log)
    assert (s["ok"], s["skipped"], s["failed"], s["known_failed"]) == (5, 0, 3, 0)
    entries = [json.loads(line) for line in open(log)]
    assert {e["youtube_id"]: e["permanent"] for e in entries} == {"v3": True, "v4": True, "v5": False}
    assert sorted(os.listdir(out)) == sorted(f"v{i}_0.mp4" for i in (0, 1, 2, 6, 7))
    # the network comes back: a rerun skips what is on disk, does not retry removed videos, retries the timeout
    flaky.clear()
    s = pd.download_all(jobs, out, fetch=fetch, workers=3, log_path=log)
    assert (s["ok"], s["skipped"], s["failed"], s["known_failed"]) == (1, 5, 0, 2)
    assert calls["v0"] == 1 and calls["v3"] == 1 and calls["v5"] == 2
    s = pd.download_all(jobs, out, fetch=fetch, workers=3, log_path=log, retry_failed=True)
    assert (s["ok"], s["skipped"], s["failed"]) == (0, 6, 2) and calls["v3"] == 2


def _fake_rows(n_per_stratum, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for cls in ("dog", "cat", "lion"):
        for src in ("audioset", "vggsound", "audioset+vggsound"):
            for i in range(n_per_stratum[(cls, src)] if isinstance(n_per_stratum, dict) else n_per_stratum):
                vid = f"{cls}{src}{i}"
                # some videos hold two non-overlapping segments: they must share a split
                for k in range(1 + (rng.random() < 0.2)):
                    rows.append({"clip_id": f"{vid}_{30 * k}", "video_id": vid, "class": cls, "source": src})
    return rows


def test_split_invariants():
    rows = _fake_rows(47)
    pd.split_rows(rows, seed=1337)
    # exact 80/10/10 per stratum, counted in videos (the unit that can move), up to rounding
    for stratum in {(r["class"], r["source"]) for r in rows}:
        vids = {s: {r["video_id"] for r in rows if (r["class"], r["source"]) == stratum and r["split"] == s}
                for s in rawdata.SPLITS}
        assert (len(vids["train"]), len(vids["val"]), len(vids["test"])) == (37, 5, 5)
    # no video in two splits
    where = collections.defaultdict(set)
    for r in rows:
        where[r["video_id"]].add(r["split"])
    assert all(len(s) == 1 for s in where.values())
    # same seed same split, another seed another split
    again = pd.split_rows([dict(r) for r in rows], seed=1337)
    assert [r["split"] for r in again] == [r["split"] for r in rows]
    other = pd.split_rows([dict(r) for r in rows], seed=7)
    assert [r["split"] for r in other] != [r["split"] for r in rows]


def test_seed_manifest_recheck_and_split():
    """The report's published clip list: read as any clip list, flag rows below the thresholds, split with
    no video in two splits (its full version leaked some videos across train/test)."""
    cands = pd.parse_clip_list(SEED_MANIFEST)
    assert len(cands) == 139
    assert collections.Counter(c["cls"] for c in cands) == {"horse": 118, "sheep": 21}
    assert {c["source"] for c in cands} == {"audioset", "vggsound", "audioset+vggsound"}
    th = dict(pann=pd.PANN_THRESHOLD, clip=pd.CLIP_THRESHOLD, vad=pd.VAD_MAX_VOICED)
    below = [pd.oracle_failures(dict(oracles={}, published_oracles=c["published"]), th) for c in cands]
    n_pann = sum("pann" in b for b in below)
    n_clip = sum("clip" in b for b in below)
    assert n_pann == sum(c["published"]["pann"] < 0.30 for c in cands) and n_pann > 0
    assert n_clip == sum(c["published"]["clip"] < 0.25 for c in cands) and n_clip > 0
    kept = [c for c, b in zip(cands, below) if not b]
    assert 0 < len(kept) < 139
    kept, merged, conflicting = pd.dedup(kept)
    rows = [{"clip_id": pd.clip_id_for(c["youtube_id"], c["start_s"]), "video_id": c["youtube_id"],
             "class": c["cls"], "source": c["source"]} for c in kept]
    # a second segment of one video (as the full list has) must follow its video into the same split
    first = rows[0]
    rows.append(dict(first, clip_id=first["video_id"] + "_300"))
    pd.split_rows(rows, seed=1337)
    where = collections.defaultdict(set)
    for r in rows:
        where[r["video_id"]].add(r["split"])
    assert all(len(s) == 1 for s in where.values())
    counts = collections.Counter(r["split"] for r in rows)
    assert counts["val"] > 0 and counts["test"] > 0 and counts["train"] > 0.7 * len(rows)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed (apt-get install ffmpeg)")
def test_manifest_source_end_to_end(tmp_path):
    """--source=manifest with the download replaced by a local fetch that writes a real mp4: rows below the
    published thresholds are removed (oracles skipped here), the rest extracted, split and labelled."""
    import csv
    with open(SEED_MANIFEST, newline="") as f:
        src = list(csv.DictReader(f))
    pick = [r for r in src if float(r["pann_score"]) < 0.3][:1] + [r for r in src if float(r["pann_score"]) >= 0.3
                                                                  and float(r["clip_score"]) >= 0.25][:3]
    lst = tmp_path / "mini.csv"
    with open(lst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(src[0].keys()))
        w.writeheader()
        w.writerows(pick)

    def fetch(youtube_id, start_s, end_s, out_path):
        if youtube_id == pick[3]["youtube_id"]:
            raise RuntimeError("ERROR: Video unavailable")
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc=size=320x240:rate=5:duration={end_s - start_s}", "-f", "lavfi", "-i",
                        f"sine=frequency=500:duration={end_s - start_s}", "-shortest", "-pix_fmt", "yuv420p",
                        "-f", "mp4", out_path], check=True)

    rows, table = pd.main(["--source=manifest", f"--path={lst}", f"--data_root={tmp_path}", "--skip_oracles=pann,clip,vad",
                           "--pseudo_labels=flat", "--download_workers=2"], fetch=fetch)
    assert table["removed"]["download_failed"] == 1 and table["removed"]["oracle_pann"] == 1
    assert len(rows) == 2
    raw = rawdata.raw_dir("mini", str(tmp_path))
    for r in rawdata.read_manifest(os.path.join(raw, "manifest.jsonl")):
        assert r["oracles"] == {"pann": "skipped", "clip": "skipped", "vad": "skipped"}
        assert r["published_oracles"]["pann"] >= 0.3 and r["published_below_threshold"] == []
        assert r["origin"]["youtube_id"] == r["video_id"] and r["source"] in ("audioset", "audioset+vggsound", "vggsound")
        a, sr = rawdata.read_wav(os.path.join(raw, r["audio"]))
        assert sr == 24000 and abs(len(a) - 240000) < 2400
        assert np.allclose(r["keyframe_times"], np.arange(10) + 0.5, atol=0.05)
        assert os.path.exists(os.path.join(raw, r["depths"][9]))
