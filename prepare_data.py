"""
prepare_data.py: get raw paired clips (audio + 10 keyframes + depth + normals) into data/<dataset>/raw/,
in the layout of rawdata.py, so tokenize_all.py and everything after it work unchanged.

    python prepare_data.py                                         # ToyZoo, synthetic, offline (default)
    python prepare_data.py --source=audioset,vggsound              # the report's 11 animal classes from the web
    python prepare_data.py --source=manifest --path=clips.csv      # re-download a published clip list exactly
    python prepare_data.py --source=folder --path=my_recordings/   # your own clips, one sub-folder per class

The web pipeline (audioset / vggsound / manifest), top to bottom:
  1. read the source CSVs and select the classes of CLASS_MAP (below); a row whose YouTube id (11 of
     A-Z a-z 0-9 _ -), time range or class name is not sound is rejected by name
  2. deduplicate across sources: same video + overlapping time range is one clip ("audioset+vggsound")
  3. download only the 10 s segment with yt-dlp, a bounded thread pool, resumable; failures are logged to
     download/failures.jsonl and counted, never fatal for one clip; but when fewer than --min_success (0.5)
     of the clips got through, the run stops (exit 1) with one line: the count and the commonest reason
  4. extract 24 kHz mono audio and 10 keyframes (one per second, centre-cropped to 224x224) with ffmpeg
  5. three oracles, each skippable (--skip_oracles=pann,clip,vad) with the manifest saying "skipped":
     PANNs Cnn14 score >= 0.30 on the class's AudioSet indices, CLIP cosine >= 0.25 for "a photo of a {class}"
     (best of the 10 keyframes), Silero VAD rejecting any human speech
  6. a deterministic split, 80/10/10 stratified by class x source, grouped by video id (no video in two splits)
  7. depth / normal pseudo-labels per keyframe (Depth-Anything-V2, DSINE), or flagged flat placeholders
  8. manifest.jsonl + dataset_table.json/.md: counts per class / source / split and removed at each filter,
     and removed.jsonl: every clip removed, with its stage, reason, and file / score / threshold
Every stage skips what is already on disk, so rerunning the same command resumes. A bad file (undecodable
audio, an unreadable image, a clip folder without a picture) is skipped and listed; --strict=True stops instead.

Class map (the report's 11 classes; AudioSet ids checked against AudioSet's class_labels_indices.csv):

  class    AudioSet segment selected if it carries    PANNs score = sum of these (index)      VGGSound labels
  dog      Dog /m/0bt9lr, Bark /m/05tny_               Dog 74 Bark 75 Yip 76 Howl 77           dog barking, dog bow-wow, dog howling,
                                                       Bow-wow 78 Growling 79 Whimper 80       dog growling, dog whimpering, dog baying
  cat      Cat /m/01yrx, Meow /m/07qrkrw               Cat 81 Purr 82 Meow 83 Hiss 84          cat meowing, cat purring, cat hissing,
                                                       Caterwaul 85                            cat growling, cat caterwauling
  horse    Horse /m/03k3r, Neigh /m/07q5rw0            Horse 87 Clip-clop 88 Neigh 89          horse neighing, horse clip-clop
  cow      Cattle /m/01xq0k1, Moo /m/07rpkh9           Cattle 90 Moo 91                        cattle mooing, cow lowing
  pig      Pig /m/068zj, Oink /t/dd00018               Pig 93 Oink 94                          pig oinking
  sheep    Sheep /m/07bgp                              Bleat 96 Sheep 97                       sheep bleating
  chicken  Chicken /m/09b5t (+Cluck, Crowing)          Chicken 99 Cluck 100 Crowing 101        chicken crowing, chicken clucking
  duck     Duck /m/09ddx, Quack /m/07qdb04             Duck 104 Quack 105                      duck quacking
  pigeon   Pigeon /m/0h0rv, Coo /m/07r_25d             Pigeon 115 Coo 116                      pigeon, dove cooing
  lion     Roaring cats /m/0cdnk                       Roaring cats 109 Roar 110               lions roaring, lions growling
  coyote   (AudioSet has no coyote class)              Yip 76 Howl 77 Canidae 122              coyote howling

Why: a segment is selected by its animal or by that animal's own call. Two calls are shared and would pull
in other animals, so they do not select on their own: Bleat (/m/07q0h5t) is a child of both Goat and Sheep,
and Roar (/m/04cvmfc) is used for many animals; they still count in the PANNs score. "Roaring cats" also
holds tigers: the CLIP oracle ("a photo of a lion") is what removes them. A segment that selects two classes
(a dog and a cat barking at each other) is dropped as ambiguous. Left out on purpose: VGGSound "goat bleating",
"bull bellowing" and "cattle, bovinae cowbell" (a bell, not an animal). The PANNs score is the SUM of the
class's clip-wise probabilities (so it can exceed 1, as the report's "PANNs 2.02" does), maximised over
3.41 s windows with a 0.5 s hop (the window offset is recorded, as in the report's published manifest).
"""
import collections
import csv
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

import configurator
import rawdata
from modalities import AUDIO_WINDOW, pick_device  # AUDIO_WINDOW: samples in one 3.41 s model window
from rawdata import RAW_SR, RAW_VIEWS, FRAME_SIZE, SPLITS

CLIP_SECONDS = 10.0   # an AudioSet / VGGSound segment; longer folder recordings are cut to this

# ---------------------------------------------------------------------------------------------------
# the class map (see the table in the docstring)

CLASS_MAP = {
    "dog": dict(audioset=["/m/0bt9lr", "/m/05tny_"],
                pann=["/m/0bt9lr", "/m/05tny_", "/m/07r_k2n", "/m/07qf0zm", "/m/07rc7d9", "/m/0ghcn6",
                      "/t/dd00136"],
                vggsound=["dog barking", "dog bow-wow", "dog howling", "dog growling", "dog whimpering",
                          "dog baying"]),
    "cat": dict(audioset=["/m/01yrx", "/m/07qrkrw"],
                pann=["/m/01yrx", "/m/02yds9", "/m/07qrkrw", "/m/07rjwbb", "/m/07r81j2"],
                vggsound=["cat meowing", "cat purring", "cat hissing", "cat growling", "cat caterwauling"]),
    "horse": dict(audioset=["/m/03k3r", "/m/07q5rw0"],
                  pann=["/m/03k3r", "/m/07rv9rh", "/m/07q5rw0"],
                  vggsound=["horse neighing", "horse clip-clop"]),
    "cow": dict(audioset=["/m/01xq0k1", "/m/07rpkh9"],
                pann=["/m/01xq0k1", "/m/07rpkh9"],
                vggsound=["cattle mooing", "cow lowing"]),
    "pig": dict(audioset=["/m/068zj", "/t/dd00018"],
                pann=["/m/068zj", "/t/dd00018"],
                vggsound=["pig oinking"]),
    "sheep": dict(audioset=["/m/07bgp"],
                  pann=["/m/07q0h5t", "/m/07bgp"],
                  vggsound=["sheep bleating"]),
    "chicken": dict(audioset=["/m/09b5t", "/m/07st89h", "/m/07qn5dc"],
                    pann=["/m/09b5t", "/m/07st89h", "/m/07qn5dc"],
                    vggsound=["chicken crowing", "chicken clucking"]),
    "duck": dict(audioset=["/m/09ddx", "/m/07qdb04"],
                 pann=["/m/09ddx", "/m/07qdb04"],
                 vggsound=["duck quacking"]),
    "pigeon": dict(audioset=["/m/0h0rv", "/m/07r_25d"],
                   pann=["/m/0h0rv", "/m/07r_25d"],
                   vggsound=["pigeon, dove cooing"]),
    "lion": dict(audioset=["/m/0cdnk"],
                 pann=["/m/0cdnk", "/m/04cvmfc"],
                 vggsound=["lions roaring", "lions growling"]),
    "coyote": dict(audioset=[],
                   pann=["/m/07r_k2n", "/m/07qf0zm", "/m/01z5f"],
                   vggsound=["coyote howling"]),
}

# index of each id used above in the 527 AudioSet outputs of PANNs (AudioSet class_labels_indices.csv)
AUDIOSET_INDEX = {
    "/m/0bt9lr": 74, "/m/05tny_": 75, "/m/07r_k2n": 76, "/m/07qf0zm": 77, "/m/07rc7d9": 78,
    "/m/0ghcn6": 79, "/t/dd00136": 80, "/m/01yrx": 81, "/m/02yds9": 82, "/m/07qrkrw": 83,
    "/m/07rjwbb": 84, "/m/07r81j2": 85, "/m/03k3r": 87, "/m/07rv9rh": 88, "/m/07q5rw0": 89,
    "/m/01xq0k1": 90, "/m/07rpkh9": 91, "/m/068zj": 93, "/t/dd00018": 94, "/m/07q0h5t": 96,
    "/m/07bgp": 97, "/m/09b5t": 99, "/m/07st89h": 100, "/m/07qn5dc": 101, "/m/09ddx": 104,
    "/m/07qdb04": 105, "/m/0cdnk": 109, "/m/04cvmfc": 110, "/m/0h0rv": 115, "/m/07r_25d": 116,
    "/m/01z5f": 122,
}
AUDIOSET_NUM_CLASSES = 527

# public source lists (downloaded with requests when not given as local files)
AUDIOSET_URL = "http://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/{}_segments.csv"
AUDIOSET_LISTS = ("balanced_train", "unbalanced_train", "eval")
VGGSOUND_URL = "https://www.robots.ox.ac.uk/~vgg/data/vggsound/vggsound.csv"
AUDIOSET_LABELS_URL = "http://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/class_labels_indices.csv"

# ---------------------------------------------------------------------------------------------------
# oracle configuration: thresholds and models (all overridable from the command line)

ORACLES = ("pann", "clip", "vad")
PANN_THRESHOLD = 0.30          # sum of the class's PANNs clip-wise probabilities, best window
PANN_HOP_S = 0.5               # hop of the scoring windows (each AUDIO_WINDOW long)
PANN_CHECKPOINT = os.path.join(os.path.expanduser("~"), "panns_data", "Cnn14_mAP=0.431.pth")
PANN_CHECKPOINT_URL = "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1"
CLIP_THRESHOLD = 0.25          # cosine of the best keyframe with "a photo of a {class}"
CLIP_MODEL = "ViT-B-32"
CLIP_PRETRAINED = "openai"
VAD_MAX_VOICED = 0.0           # fraction of the clip Silero VAD may call speech ("any speech" rejects)
DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
# Hugging Face revision of DEPTH_MODEL: None = the default branch on the first run, whose commit is then recorded
# in raw/downloads.json and loaded by every later run of that dataset (put a commit hash here to pin it for all)
DEPTH_REVISION = None
# DSINE's torch.hub entry, as owner/repo:ref. No commit of hugoycj/DSINE-hub could be looked up where this was
# written, so the ref is its branch: the code is fetched as GitHub's zip of that ref, its tree sha256 and commit
# are recorded in raw/downloads.json on first use, and a later tree that differs is refused before any of it runs
# (put a commit hash after the colon to pin it for everyone)
NORMAL_HUB = ("hugoycj/DSINE-hub:main", "DSINE")
HUB_ZIP_URL = "https://github.com/{repo}/archive/{ref}.zip"
HUB_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "nano4m", "hub")
NORMAL_WEIGHTS_URL = "https://huggingface.co/camenduru/DSINE/resolve/main/dsine.pt"   # what the entry would fetch
NORMAL_WEIGHTS = os.path.join(os.path.expanduser("~"), ".cache", "nano4m", "dsine.pt")
# sha256 of each weight file fetched by URL, where upstream publishes one (None: recorded on first download)
PINNED_SHA256 = {"pann_cnn14": None, "dsine": None}

# ---------------------------------------------------------------------------------------------------
# reading the source lists


def _open_text(path_or_text):
    """A path, or the CSV text itself (tests pass small strings in the real formats)."""
    if "\n" in path_or_text or not os.path.exists(path_or_text):
        if "\n" not in path_or_text:
            raise FileNotFoundError(f"{path_or_text}: CSV file not found")
        return io.StringIO(path_or_text), "<text>"
    return open(path_or_text, newline="", encoding="utf-8"), path_or_text


def parse_audioset_csv(path_or_text):
    """An AudioSet segment list -> [{youtube_id, start_s, end_s, labels}]. The format: '#' comment lines,
    then `YTID, start_seconds, end_seconds, "label,label,..."` with a space after each comma."""
    f, name = _open_text(path_or_text)
    out = []
    with f:
        for i, row in enumerate(csv.reader(f, skipinitialspace=True), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 4:
                raise ValueError(f"{name}:{i}: expected 4 fields (YTID, start, end, labels), got {row}")
            try:
                start, end = float(row[1]), float(row[2])
            except ValueError:
                raise ValueError(f"{name}:{i}: start/end are not numbers: {row}") from None
            out.append(dict(youtube_id=row[0].strip(), start_s=start, end_s=end,
                            labels=[x.strip() for x in row[3].split(",") if x.strip()]))
    return out


def parse_vggsound_csv(path_or_text):
    """The VGGSound list -> [{youtube_id, start_s, end_s, label, vgg_split}]. The format: no header,
    `YTID,start_seconds,label,train|test`, labels with a comma quoted ("pigeon, dove cooing")."""
    f, name = _open_text(path_or_text)
    out = []
    with f:
        for i, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 4:
                raise ValueError(f"{name}:{i}: expected 4 fields (YTID, start, label, split), got {row}")
            try:
                start = float(row[1])
            except ValueError:
                if i == 1:
                    continue  # a header line some copies carry
                raise ValueError(f"{name}:{i}: start is not a number: {row}") from None
            out.append(dict(youtube_id=row[0].strip(), start_s=start, end_s=start + CLIP_SECONDS,
                            label=row[2].strip(), vgg_split=row[3].strip()))
    return out


def select_audioset(segments, classes, removed=None):
    """Assign each segment to the one class whose selecting ids it carries. Returns (candidates,
    n_ambiguous): a segment selecting two classes is dropped (and listed in `removed`, a Removals)."""
    picked, ambiguous = [], 0
    for seg in segments:
        labels = set(seg["labels"])
        hit = [c for c in classes if labels & set(CLASS_MAP[c]["audioset"])]
        if len(hit) > 1:
            ambiguous += 1
            if removed is not None:
                removed.add("audioset_ambiguous_class", f"{seg['youtube_id']}_{seg['start_s']:g}", "select",
                            f"selects {' and '.join(hit)}: the label is in doubt", source="audioset")
        elif hit:
            picked.append(dict(youtube_id=seg["youtube_id"], start_s=seg["start_s"], end_s=seg["end_s"],
                               cls=hit[0], source="audioset", origin_labels=seg["labels"]))
    return picked, ambiguous


def select_vggsound(rows, classes):
    by_label = {lab: c for c in classes for lab in CLASS_MAP[c]["vggsound"]}
    return [dict(youtube_id=r["youtube_id"], start_s=r["start_s"], end_s=r["end_s"], cls=by_label[r["label"]],
                 source="vggsound", origin_labels=[r["label"]]) for r in rows if r["label"] in by_label]


def parse_clip_list(path):
    """A published clip list (the report's manifest format: youtube_id, start_s, class, source and
    optional oracle scores pann_score / clip_score / vad_voiced_frac) -> candidates. A row that cannot be
    read (a number that is not one) comes back with its `problem` and `row` ("list.csv:7") set, so that
    check_candidates rejects it by name and the other rows go on."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: clip list not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        need = {"youtube_id", "start_s", "class"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: a clip list needs the columns {sorted(need)}, has {reader.fieldnames}")
        out = []
        for i, r in enumerate(reader, 2):
            row = dict(youtube_id=(r["youtube_id"] or "").strip(), cls=(r["class"] or "").strip(),
                       source=(r.get("source") or "manifest").strip(), published={}, origin_labels=[],
                       row=f"{path}:{i}", start_s=float("nan"), end_s=float("nan"))
            try:
                row["start_s"] = float(r["start_s"])
                row["end_s"] = float(r["end_s"]) if r.get("end_s") else row["start_s"] + CLIP_SECONDS
                for key, name in (("pann_score", "pann"), ("clip_score", "clip"), ("vad_voiced_frac", "vad")):
                    if r.get(key) not in (None, ""):
                        row["published"][name] = float(r[key])
            except (TypeError, ValueError) as e:
                row["problem"] = f"a number that is not one ({e})"
            for key in ("clip_id", "stem"):  # a list's own clip id must be safe to use as a file name too
                if r.get(key) and not rawdata.SAFE_NAME.fullmatch(r[key].strip()):
                    row["problem"] = f"{key} {r[key].strip()!r} is not a safe file name"
            out.append(row)
    return out


YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
CLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _,.'()-]{0,63}")  # "pigeon, dove": printable, never a path


def check_candidates(cands, removed):
    """Keep the candidates whose YouTube id (11 of A-Z a-z 0-9 _ -), time range and class name are sound;
    every other one is listed in `removed` (stage "invalid") with its row and the reason, never used."""
    ok = []
    for c in cands:
        problem = c.get("problem")
        if problem is None and not YOUTUBE_ID.fullmatch(c["youtube_id"]):
            problem = f"youtube_id {c['youtube_id']!r} is not a YouTube id (11 of A-Z a-z 0-9 _ -)"
        elif problem is None and not (np.isfinite(c["start_s"]) and np.isfinite(c["end_s"])
                                      and 0 <= c["start_s"] < c["end_s"]):
            problem = f"time range {c['start_s']}-{c['end_s']} s is not 0 <= start < end"
        elif problem is None and not CLASS_NAME.fullmatch(c["cls"]):
            problem = f"class {c['cls']!r} is not a class name (letters, digits, space _ , . ' ( ) -)"
        elif problem is None and not rawdata.SAFE_NAME.fullmatch(clip_id_for(c["youtube_id"], c["start_s"])):
            problem = f"start {c['start_s']} s makes no usable clip id"
        if problem:
            removed.add("invalid_row", str(c["youtube_id"])[:40], "invalid", problem, row=c.get("row"))
        else:
            ok.append(c)
    return ok


def dedup(candidates, removed=None):
    """Same video + overlapping time range = one clip. Overlapping segments of the same class merge (their
    sources join, e.g. 'audioset+vggsound', the earliest start is kept); overlapping segments of different
    classes are all dropped, since the clip's label is in doubt. Returns (kept, n_merged, n_conflicting);
    each segment merged away or dropped is listed in `removed` (a Removals) when given."""
    by_video = {}
    for c in candidates:
        by_video.setdefault(c["youtube_id"], []).append(c)
    kept, merged, conflicting = [], 0, 0
    for vid in sorted(by_video):
        segs = sorted(by_video[vid], key=lambda c: (c["start_s"], c["source"]))
        groups = []  # runs of overlapping segments
        for s in segs:
            if groups and s["start_s"] < max(g["end_s"] for g in groups[-1]):
                groups[-1].append(s)
            else:
                groups.append([s])
        for g in groups:
            if len({s["cls"] for s in g}) > 1:
                conflicting += len(g)
                for s in g if removed is not None else []:
                    removed.add("dedup_conflicting_class", clip_id_for(vid, s["start_s"]), "dedup",
                                f"overlaps a segment of another class ({', '.join(sorted({x['cls'] for x in g}))}) "
                                f"of the same video: the label is in doubt", source=s["source"], **{"class": s["cls"]})
                continue
            for s in g[1:] if removed is not None else []:
                removed.add("dedup_merged", clip_id_for(vid, s["start_s"]), "dedup",
                            f"merged into {clip_id_for(vid, g[0]['start_s'])} (same video, overlapping time)",
                            source=s["source"], **{"class": s["cls"]})
            first = dict(g[0])
            sources = sorted({part for s in g for part in s["source"].split("+")})
            first["source"] = "+".join(sources)
            first["origin_labels"] = sorted({lab for s in g for lab in s["origin_labels"]})
            merged += len(g) - 1
            kept.append(first)
    return kept, merged, conflicting


def clip_id_for(youtube_id, start_s):
    """'2w2KITaBD5M', 30.0 -> '2w2KITaBD5M_30' (the report's stem)."""
    return f"{youtube_id}_{start_s:g}"


# ---------------------------------------------------------------------------------------------------
# downloading


def fetch_source_list(url, path):
    """Download a public CSV once (atomic), or tell the user where to put it."""
    if os.path.exists(path):
        return path
    import requests
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        r = requests.get(url, timeout=60)
        r.raise_for_status()
    except Exception as e:
        raise RuntimeError(f"could not download {url} ({e}); download it by hand to {path}") from None
    with rawdata.atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(r.content)
    return path


PERMANENT_ERRORS = ("private video", "video unavailable", "has been removed", "not available in your country",
                    "account associated with this video has been terminated", "copyright", "sign in to confirm your age")


YOUTUBE_URL = "https://www.youtube.com/watch?v={youtube_id}"


def fetch_ytdlp(youtube_id, start_s, end_s, out_path, url_template=YOUTUBE_URL):
    """Download only [start_s, end_s] of a video to out_path (mp4) with yt-dlp, from the page url_template
    names (YouTube's watch page; tests point it at a local server). Raises RuntimeError with yt-dlp's
    message on failure."""
    try:
        import yt_dlp  # noqa: F401  (only to give a clear error; the CLI below is the same package)
    except ImportError:
        raise RuntimeError("yt-dlp is not installed: pip install -r requirements-extra.txt") from None
    with rawdata.atomic_write(out_path) as tmp:
        cmd = [sys.executable, "-m", "yt_dlp", "--quiet", "--no-warnings", "--no-playlist",
               "--download-sections", f"*{start_s}-{end_s}", "--force-keyframes-at-cuts",
               "-f", "bv*[height<=480]+ba/b[height<=480]/bv*+ba/b", "--merge-output-format", "mp4",
               "-o", tmp, url_template.format(youtube_id=youtube_id)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.exists(tmp):
            raise RuntimeError((r.stderr or r.stdout or "yt-dlp failed").strip().splitlines()[-1][:300])


def download_all(jobs, out_dir, fetch=fetch_ytdlp, workers=8, log_path=None, retry_failed=False):
    """Download each job {clip_id, youtube_id, start_s, end_s} to out_dir/<clip_id>.mp4 with a bounded
    thread pool. A file already there is skipped (resume). A failure is appended to log_path (one JSON line)
    and counted, never raised. A permanent failure (private / removed video) found in the log is not
    retried unless retry_failed. Returns {'ok', 'skipped', 'failed', 'known_failed', 'failures' (this
    run's), 'known' (the log's entries for the known ones)}."""
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # what a killed run left half-written (.<clip>.mp4.tmp<pid>...)
        if stale.startswith(".") and ".mp4.tmp" in stale:
            os.remove(os.path.join(out_dir, stale))
    log_path = log_path or os.path.join(out_dir, "failures.jsonl")
    known = {}
    if os.path.exists(log_path) and not retry_failed:
        with open(log_path) as f:
            for line in f:
                if line.strip():
                    e = json.loads(line)
                    if e.get("permanent"):
                        known[e["clip_id"]] = e
    stats = dict(ok=0, skipped=0, failed=0, known_failed=0, failures=[], known=[])
    lock = threading.Lock()

    def one(job):
        path = os.path.join(out_dir, job["clip_id"] + ".mp4")
        if os.path.exists(path):
            return "skipped", None
        if job["clip_id"] in known:
            return "known_failed", known[job["clip_id"]]["error"]
        try:
            fetch(job["youtube_id"], job["start_s"], job["end_s"], path)
        except Exception as e:  # any failure of one video is recorded, never fatal for the run
            return "failed", f"{type(e).__name__}: {e}"
        if not os.path.exists(path):
            return "failed", "fetch returned without writing the file"
        return "ok", None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(one, job): job for job in jobs}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="download", unit="clip"):
            job = futures[fut]
            status, err = fut.result()
            with lock:
                stats[status] += 1
                if status == "known_failed":
                    stats["known"].append(known[job["clip_id"]])
                if status == "failed":
                    entry = dict(clip_id=job["clip_id"], youtube_id=job["youtube_id"], start_s=job["start_s"],
                                 error=err, permanent=any(k in err.lower() for k in PERMANENT_ERRORS),
                                 time=time.strftime("%Y-%m-%d %H:%M:%S"))
                    stats["failures"].append(entry)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(entry) + "\n")
    return stats


# ---------------------------------------------------------------------------------------------------
# decoding media with ffmpeg (and images with Pillow)

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class BadFile(ValueError):
    """A media file that cannot be used: `file` and `reason` are kept apart for the list of removed clips."""
    def __init__(self, file, reason):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


class TooShort(ValueError):
    """A clip shorter than one model window, under --min_length_policy=refuse."""
    def __init__(self, file, seconds):
        super().__init__(f"{file}: {seconds:.2f} s of audio is shorter than the {AUDIO_WINDOW / RAW_SR:.2f} s "
                         f"model window (--min_length_policy=refuse)")
        self.file, self.seconds = file, seconds


def one_line(stderr):
    """ffmpeg's complaint in one line (its last 300 characters), for a list with one reason per line."""
    return " / ".join(x.strip() for x in stderr.decode(errors="replace").strip().splitlines())[-300:]


def require_ffmpeg():
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is not on PATH: install it (Debian/Ubuntu: apt-get install -y ffmpeg; "
                           "macOS: brew install ffmpeg)")


def decode_audio(path, sr=RAW_SR, max_seconds=CLIP_SECONDS):
    """Any audio or video file -> float32 mono [T] at sr (at most max_seconds), through ffmpeg."""
    require_ffmpeg()
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-t", str(max_seconds), "-vn", "-ac", "1",
           "-ar", str(sr), "-f", "f32le", "-"]
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        raise BadFile(path, f"ffmpeg could not decode audio ({one_line(r.stderr)})")
    audio = np.frombuffer(r.stdout, dtype="<f4").copy()
    if audio.size == 0:
        raise BadFile(path, "no audio stream (or zero-length audio)")
    return audio


def video_frame(path, t, size=FRAME_SIZE):
    """The frame of a video at time t (s) -> uint8 [size, size, 3], scaled so the short side is `size` and
    centre-cropped."""
    vf = f"scale={size}:{size}:force_original_aspect_ratio=increase,crop={size}:{size}"
    n = size * size * 3
    for ss in (t, max(0.0, t - 0.5), 0.0):  # a seek past the last frame falls back to an earlier time
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-ss", f"{ss:.3f}", "-i", path, "-frames:v", "1",
               "-vf", vf, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        r = subprocess.run(cmd, capture_output=True)
        if r.returncode == 0 and len(r.stdout) >= n:
            return np.frombuffer(r.stdout[:n], dtype=np.uint8).reshape(size, size, 3).copy()
    raise BadFile(path, f"no video frame could be read near t={t:.2f} s ({one_line(r.stderr)})")


def video_frames(path, times, size=FRAME_SIZE):
    """Frames at equally spaced times (keyframe_times) in ONE ffmpeg call: seek to the first, then the fps
    filter takes the frame nearest each later time. Any frame it could not give (a video track shorter than
    the audio) is read on its own with video_frame."""
    step = times[1] - times[0] if len(times) > 1 else 1.0
    vf = f"fps={1.0 / step:.6f},scale={size}:{size}:force_original_aspect_ratio=increase,crop={size}:{size}"
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-ss", f"{times[0]:.3f}", "-i", path, "-frames:v", str(len(times)),
           "-vf", vf, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    r = subprocess.run(cmd, capture_output=True)
    n = size * size * 3
    got = len(r.stdout) // n if r.returncode == 0 else 0
    frames = [np.frombuffer(r.stdout[i * n:(i + 1) * n], dtype=np.uint8).reshape(size, size, 3).copy()
              for i in range(min(got, len(times)))]
    return frames + [video_frame(path, t, size) for t in times[len(frames):]]


def load_image(path, size=FRAME_SIZE):
    """An image file (jpg / png / webp / ...) -> uint8 [size, size, 3], short side scaled and centre-cropped."""
    from PIL import Image, ImageOps
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:
        raise BadFile(path, f"not a readable image ({e})") from None
    img = ImageOps.exif_transpose(img).convert("RGB")
    return np.asarray(ImageOps.fit(img, (size, size), Image.BICUBIC), dtype=np.uint8)


def keyframe_times(duration_s, views=RAW_VIEWS):
    """One keyframe per second of a 10 s clip (0.5, 1.5, ... 9.5); a shorter clip spreads its 10 evenly."""
    span = min(duration_s, CLIP_SECONDS)
    return [round((i + 0.5) * span / views, 4) for i in range(views)]


def pad_audio(audio, policy, name):
    """Pad a clip shorter than one model window with silence (policy 'pad') or refuse it ('refuse')."""
    if len(audio) >= AUDIO_WINDOW:
        return audio
    if policy == "refuse":
        raise TooShort(name, len(audio) / RAW_SR)
    return np.concatenate([audio, np.zeros(AUDIO_WINDOW - len(audio), np.float32)])


def write_clip(raw, clip_id, audio, frames):
    """Write audio.wav + frame_XX.png of one clip (atomically, file by file). Returns (audio, frames) paths
    relative to raw/."""
    d = rawdata.clip_dir(raw, clip_id)
    os.makedirs(d, exist_ok=True)
    rawdata.write_wav(os.path.join(d, "audio.wav"), audio)
    rel_frames = []
    for i, fr in enumerate(frames):
        rawdata.write_png(os.path.join(d, f"frame_{i:02d}.png"), fr)
        rel_frames.append(f"clips/{clip_id}/frame_{i:02d}.png")
    return f"clips/{clip_id}/audio.wav", rel_frames


def clip_done(raw, clip_id):
    d = rawdata.clip_dir(raw, clip_id)
    return os.path.exists(os.path.join(d, "audio.wav")) and all(
        os.path.exists(os.path.join(d, f"frame_{i:02d}.png")) for i in range(RAW_VIEWS))


def cached_media(raw, clip_id, min_length_policy="pad"):
    """The row fields a finished clip saved in clips/<id>/media.json, or None: a rerun decodes no media again.
    The length policy still applies to a clip written under another one."""
    path = os.path.join(rawdata.clip_dir(raw, clip_id), "media.json")
    if not (os.path.exists(path) and clip_done(raw, clip_id)):
        return None
    with open(path) as f:
        media = json.load(f)
    if min_length_policy == "refuse" and media["duration_s"] * RAW_SR < AUDIO_WINDOW:
        raise TooShort(media.get("origin", {}).get("path", clip_id), media["duration_s"])
    return media


def save_media(raw, clip_id, media):
    """Written last, once the clip's files are all there: it marks the clip finished."""
    path = os.path.join(rawdata.clip_dir(raw, clip_id), "media.json")
    rawdata.write_json(path, media)
    return media


def extract_video_clip(raw, clip_id, media_path, min_length_policy="pad"):
    """A video file -> the clip's audio.wav (24 kHz mono) and 10 keyframes. Returns the row's media fields."""
    media = cached_media(raw, clip_id, min_length_policy)
    if media is not None:
        return media
    audio = decode_audio(media_path)
    duration = len(audio) / RAW_SR
    times = keyframe_times(duration)
    padded = pad_audio(audio, min_length_policy, media_path)  # a refused clip reads no frames
    write_clip(raw, clip_id, padded, video_frames(media_path, times))
    return save_media(raw, clip_id, dict(audio=f"clips/{clip_id}/audio.wav",
                                         frames=[f"clips/{clip_id}/frame_{i:02d}.png" for i in range(RAW_VIEWS)],
                                         keyframe_times=times, duration_s=round(duration, 4)))


# ---------------------------------------------------------------------------------------------------
# the three oracles


def load_vad():
    try:
        from silero_vad import load_silero_vad
    except ImportError:
        raise RuntimeError("the VAD oracle needs silero-vad: pip install silero-vad "
                           "(or skip it with --skip_oracles=vad)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_silero_vad()


def vad_voiced_fraction(audio, sr, model):
    """Fraction of the clip that Silero VAD calls human speech (0.0 = none)."""
    import torch
    import torchaudio.functional as AF
    from silero_vad import get_speech_timestamps
    x = AF.resample(torch.as_tensor(audio, dtype=torch.float32), sr, 16000)
    stamps = get_speech_timestamps(x, model, sampling_rate=16000)
    model.reset_states()
    return float(sum(s["end"] - s["start"] for s in stamps) / max(1, len(x)))


def _panns_models():
    """Import panns_inference.models. The package downloads AudioSet's label list at import time (with wget),
    so put it in place first with requests, or fail with a clear message."""
    labels = os.path.join(os.path.expanduser("~"), "panns_data", "class_labels_indices.csv")
    if not os.path.exists(labels) or os.path.getsize(labels) == 0:
        fetch_source_list(AUDIOSET_LABELS_URL, labels)
    try:
        from panns_inference import models
    except ImportError:
        raise RuntimeError("the PANNs oracle needs panns-inference: pip install panns-inference "
                           "(or skip it with --skip_oracles=pann)") from None
    return models


def build_cnn14():
    """PANNs Cnn14 in the configuration of its released AudioSet checkpoint (32 kHz, 527 classes)."""
    return _panns_models().Cnn14(sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50,
                                 fmax=14000, classes_num=AUDIOSET_NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------
# downloads: every external file is checked against a pinned sha256, or against the one recorded in the
# dataset's raw/downloads.json on first use (a later mismatch is refused, not used)

DOWNLOADS_JSON = "downloads.json"


def sha256_file(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recorded_downloads(raw):
    path = os.path.join(raw, DOWNLOADS_JSON) if raw else None
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def record_download(raw, name, entry):
    """Add or confirm `name` in raw/downloads.json (the dataset's record of what produced it)."""
    if not raw:
        return
    have = recorded_downloads(raw)
    have[name] = dict(have.get(name, {}), **entry)
    os.makedirs(raw, exist_ok=True)
    rawdata.write_json(os.path.join(raw, DOWNLOADS_JSON), have, indent=1, sort_keys=True)


def check_sha256(name, path, raw=None, pinned=None, url=None):
    """The file's sha256 must equal the pinned one, else the one this dataset recorded; the first use of an
    unpinned file records it. A mismatch is refused with both hashes named."""
    got = sha256_file(path)
    want = pinned or recorded_downloads(raw).get(name, {}).get("sha256")
    if want and got != want:
        where = "pinned in prepare_data.py" if pinned else f"recorded in {os.path.join(raw, DOWNLOADS_JSON)}"
        raise RuntimeError(f"{path}: sha256 {got} differs from the {want} {where} for {name}: refusing a changed "
                           f"or corrupt file (delete it to download again)")
    record_download(raw, name, {"sha256": got, **({"url": url} if url else {})})
    return got


def fetch_verified(name, url, dest, raw=None, pinned=None, timeout=60):
    """Download url to dest once (temp file, then rename) and check it with check_sha256. file:// and http(s)://
    both work (urllib)."""
    import urllib.request
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        with rawdata.atomic_write(dest) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
            except Exception as e:
                raise RuntimeError(f"{name}: download of {url} failed ({e})") from None
            if pinned and sha256_file(tmp) != pinned:
                raise RuntimeError(f"{name}: {url} gave sha256 {sha256_file(tmp)}, not the pinned {pinned}: refused")
    check_sha256(name, dest, raw, pinned, url)
    return dest


def load_pann(device, checkpoint=PANN_CHECKPOINT, raw=None, url=PANN_CHECKPOINT_URL):
    """Cnn14 with its released AudioSet weights: fetched once, sha256-checked (raw/downloads.json), loaded with
    weights_only=True (a state dict needs no pickle)."""
    import torch
    model = build_cnn14()
    try:
        fetch_verified("pann_cnn14", url, checkpoint, raw, PINNED_SHA256["pann_cnn14"])
    except RuntimeError as e:
        raise RuntimeError(f"PANNs weights at {checkpoint}: {e}; download them by hand, or "
                           f"--skip_oracles=pann") from None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"] if "model" in state else state)
    return model.to(device).eval()


def pann_score(audio, sr, class_name, model, hop_s=PANN_HOP_S, device="cpu"):
    """Best over 3.41 s windows (hop hop_s) of the sum of the class's PANNs clip-wise probabilities.
    Returns (score, window offset in s)."""
    import torch
    import torchaudio.functional as AF
    idx = [AUDIOSET_INDEX[m] for m in CLASS_MAP[class_name]["pann"]]
    x = AF.resample(torch.as_tensor(audio, dtype=torch.float32), sr, 32000)
    win = int(round(AUDIO_WINDOW / RAW_SR * 32000))
    if len(x) < win:
        x = torch.nn.functional.pad(x, (0, win - len(x)))
    hop = int(round(hop_s * 32000))
    starts = list(range(0, len(x) - win + 1, hop))
    batch = torch.stack([x[s:s + win] for s in starts]).to(device)
    with torch.no_grad():
        probs = model(batch, None)["clipwise_output"][:, idx].sum(dim=1).float().cpu()
    best = int(probs.argmax())
    return float(probs[best]), round(starts[best] / 32000, 3)


def load_clip(device, name=CLIP_MODEL, pretrained=CLIP_PRETRAINED, raw=None):
    """(model, preprocess, tokenizer) of open_clip; pretrained=None gives the untrained architecture. The released
    weights are fetched by open_clip's own downloader first, so their sha256 is checked (raw/downloads.json)
    before the model reads them from that same cache file."""
    try:
        import open_clip
    except ImportError:
        raise RuntimeError("the CLIP oracle needs open_clip: pip install open_clip_torch "
                           "(or skip it with --skip_oracles=clip)") from None
    try:
        if pretrained and not os.path.isfile(pretrained):
            cfg = open_clip.get_pretrained_cfg(name, pretrained)
            path = open_clip.pretrained.download_pretrained(cfg)
            check_sha256(f"clip_{name}_{pretrained}", path, raw, url=cfg.get("hf_hub") or cfg.get("url"))
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except Exception as e:
        raise RuntimeError(f"could not load CLIP {name} / {pretrained} ({e}): the weights download on first "
                           f"use; or --skip_oracles=clip") from None
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(name)


def clip_score(frames, class_name, clip, device="cpu"):
    """Best over the keyframes of the cosine between the image and "a photo of a {class}".
    Returns (score, best frame index)."""
    import torch
    from PIL import Image
    model, preprocess, tokenizer = clip
    images = torch.stack([preprocess(Image.fromarray(f)) for f in frames]).to(device)
    text = tokenizer([f"a photo of a {class_name}"]).to(device)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(text).float(), dim=-1)
    cos = (img @ txt.T)[:, 0].cpu()
    best = int(cos.argmax())
    return float(cos[best]), best


def run_oracles(raw, rows, skip, device, pann_checkpoint=PANN_CHECKPOINT, models=None):
    """Score every row with every oracle not in `skip`; scores go to row['oracles'] (and row['oracle_info'])
    and are cached in clips/<id>/oracles.json so a rerun does not recompute them. `models` may hand in
    already-built models {'vad', 'pann', 'clip'} (tests pass untrained ones)."""
    from tqdm import tqdm
    models = dict(models or {})

    def need(name, loader):  # build each model once, on first use
        if models.get(name) is None:
            models[name] = loader()
        return models[name]

    for row in tqdm(rows, desc="oracles", unit="clip"):
        cache = os.path.join(rawdata.clip_dir(raw, row["clip_id"]), "oracles.json")
        done = json.load(open(cache)) if os.path.exists(cache) else {}
        scores, info = dict(done.get("scores", {})), dict(done.get("info", {}))
        todo = [o for o in ORACLES if o not in skip and not isinstance(scores.get(o), (int, float))]
        pann_ok = row["class"] in CLASS_MAP
        if todo:
            audio, sr = rawdata.read_wav(os.path.join(raw, row["audio"]))
            audio = audio[:int(round(row.get("duration_s", len(audio) / sr) * sr))]  # not the padding
            for o in todo:
                if o == "vad":
                    scores["vad"] = round(vad_voiced_fraction(audio, sr, need("vad", load_vad)), 4)
                elif o == "pann" and not pann_ok:
                    scores["pann"] = "skipped"
                    info["pann"] = f"no AudioSet indices for class {row['class']!r}"
                elif o == "pann":
                    pann = need("pann", lambda: load_pann(device, pann_checkpoint, raw))
                    scores["pann"], off = pann_score(audio, sr, row["class"], pann, device=device)
                    scores["pann"] = round(scores["pann"], 4)
                    info["pann_window_offset_s"] = off
                elif o == "clip":
                    frames = [rawdata.read_png(os.path.join(raw, p)) for p in row["frames"]]
                    clip = need("clip", lambda: load_clip(device, raw=raw))
                    scores["clip"], best = clip_score(frames, row["class"], clip, device)
                    scores["clip"] = round(scores["clip"], 4)
                    info["clip_best_frame"] = best
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            rawdata.write_json(cache, dict(scores=scores, info=info))
        for o in ORACLES:
            if o in skip and not isinstance(scores.get(o), (int, float)):
                scores[o] = "skipped"
        row["oracles"] = {o: scores[o] for o in ORACLES}
        row["oracle_info"] = info
    return rows


def oracle_failures(row, thresholds):
    """The filters a row fails. A skipped oracle uses the published score when the row has one (a
    rebuilt clip list is re-checked against the thresholds), else it passes."""
    fails = []
    for o in ORACLES:
        s = row.get("oracles", {}).get(o, "skipped")
        if not isinstance(s, (int, float)):
            s = row.get("published_oracles", {}).get(o)
        if s is None:
            continue
        if (o == "vad" and s > thresholds["vad"]) or (o != "vad" and s < thresholds[o]):
            fails.append(o)
    return fails


# ---------------------------------------------------------------------------------------------------
# the structural pseudo-labels: depth (Depth-Anything-V2) and normals (DSINE)


def disparity_to_depth_u16(disp):
    """Depth-Anything-V2 predicts relative INVERSE depth (larger = closer). Convert it to depth (larger =
    farther): normalise the disparity to [0, 1], floor it at 1% so the sky stays finite, invert, and scale the
    image's range to uint16. Relative depth: only the ordering and ratios inside one image mean anything."""
    d = np.asarray(disp, dtype=np.float64)
    d = (d - d.min()) / max(d.max() - d.min(), 1e-12)
    depth = 1.0 / np.maximum(d, 0.01)
    depth = (depth - depth.min()) / max(depth.max() - depth.min(), 1e-12)
    return np.round(depth * 65535).astype(np.uint16)


def normals_to_u8(n):
    """Unit normals [3, H, W] or [H, W, 3] in [-1, 1] -> uint8 [H, W, 3], channel = (n + 1) / 2 * 255."""
    n = np.asarray(n, dtype=np.float32)
    if n.shape[0] == 3 and n.shape[-1] != 3:
        n = n.transpose(1, 2, 0)
    return np.round((np.clip(n, -1, 1) + 1) / 2 * 255).astype(np.uint8)


FLAT_DEPTH = 32768                 # a constant plane, mid-range
FLAT_NORMAL = (0.0, 0.0, 1.0)      # facing the camera (x right, y up, z toward the viewer)


def structure_available():
    try:
        import transformers  # noqa: F401
        import geffnet  # noqa: F401  (DSINE's backbone, pulled by its torch.hub entry)
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()      # DSINE's hub entry runs on CUDA only


def load_depth_model(device, raw=None, model=DEPTH_MODEL, revision=DEPTH_REVISION):
    """Depth-Anything-V2 through transformers' depth-estimation pipeline, at a pinned revision: the one given,
    else the commit this dataset recorded on its first run, else the default branch (whose commit is recorded)."""
    try:
        from transformers import pipeline
    except ImportError:
        raise RuntimeError("depth pseudo-labels need transformers: pip install -r requirements-extra.txt "
                           "(or --pseudo_labels=flat for flagged placeholders)") from None
    revision = revision or recorded_downloads(raw).get("depth_anything_v2", {}).get("revision")
    depth = pipeline("depth-estimation", model=model, revision=revision, device=0 if device == "cuda" else -1)
    commit = getattr(depth.model.config, "_commit_hash", None)
    if revision and commit and len(revision) == 40 and commit != revision:
        raise RuntimeError(f"{model}: asked for revision {revision}, loaded {commit}")
    record_download(raw, "depth_anything_v2", {"model": model, "revision": commit or revision})
    return depth


def load_normal_model(device, raw=None, hub=NORMAL_HUB, source="github", weights=NORMAL_WEIGHTS,
                      weights_url=NORMAL_WEIGHTS_URL):
    """DSINE through its torch.hub entry DSINE(local_file_path=...) -> a predictor with infer_cv2(bgr uint8)
    -> normals [1, 3, H, W]. The weights are fetched and sha256-checked here and handed to the entry by path,
    and the hub code's hubconf.py is sha256-checked too (raw/downloads.json)."""
    import torch
    repo, entry = hub
    if source == "github" and not torch.cuda.is_available():   # before a 300 MB download that could not be used
        raise RuntimeError("DSINE's torch.hub entry places its model on CUDA: normal pseudo-labels need a GPU "
                           "(or --pseudo_labels=flat for flagged placeholders)")
    fetch_verified("dsine", weights_url, weights, raw, PINNED_SHA256["dsine"])
    commit = recorded_downloads(raw).get("dsine_hub", {}).get("commit")    # a later run fetches that commit
    repo_dir = repo if source == "local" else fetch_hub_code(repo.split(":")[0] + ":" + commit if commit else repo, raw)
    check_hub_tree("dsine_hub", repo_dir, raw, url=repo)     # before torch.hub runs a line of it
    try:
        normal = torch.hub.load(repo_dir, entry, local_file_path=weights, source="local", trust_repo=True)
    except Exception as e:
        raise RuntimeError(f"could not load DSINE from torch.hub {repo} ({type(e).__name__}: {e}); pip install "
                           "geffnet and check the network; its entry places the model on CUDA, so it needs a GPU; "
                           "or --pseudo_labels=flat") from None
    if hasattr(normal, "model"):        # the entry picks its device itself: follow the one asked for
        normal.model.to(device)
        if hasattr(normal.model, "pixel_coords"):
            normal.model.pixel_coords = normal.model.pixel_coords.to(device)
        normal.device = torch.device(device)
    return normal


def hub_tree_sha256(folder):
    """One sha256 over every file of a code tree (relative path and bytes, in sorted order), caches excluded."""
    import hashlib
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git"))
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def check_hub_tree(name, folder, raw=None, url=None):
    """Hub code must hash as recorded for this dataset (the first use records it); checked before it is run."""
    got = hub_tree_sha256(folder)
    want = recorded_downloads(raw).get(name, {}).get("tree_sha256")
    if want and got != want:
        raise RuntimeError(f"{folder}: the hub code's tree sha256 {got} differs from the {want} recorded in "
                           f"{os.path.join(raw, DOWNLOADS_JSON)} for {name}: refusing changed code (delete the "
                           f"folder and that entry to take the new code)")
    commit_file = os.path.join(folder, ".commit")
    commit = open(commit_file).read().strip() if os.path.exists(commit_file) else None
    record_download(raw, name, {"tree_sha256": got, **({"url": url} if url else {}),
                                **({"commit": commit} if commit else {})})
    return got


def fetch_hub_code(hub, raw=None, cache=HUB_CACHE, url_template=HUB_ZIP_URL, timeout=60):
    """owner/repo:ref -> a local folder with that ref's code, fetched once as GitHub's zip (whose comment holds
    the commit, kept in .commit) and unpacked without running anything; torch.hub then loads it as source='local'."""
    import urllib.request
    import zipfile
    repo, ref = hub.split(":", 1) if ":" in hub else (hub, "main")
    dest = os.path.join(cache, repo.replace("/", "_") + "_" + ref)
    if os.path.isdir(dest):
        return dest
    os.makedirs(cache, exist_ok=True)
    url = url_template.format(repo=repo, ref=ref)
    tmp_zip, tmp_dir = rawdata.atomic_path(dest + ".zip"), rawdata.atomic_path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp_zip, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        with zipfile.ZipFile(tmp_zip) as z:
            tops = {n.split("/", 1)[0] for n in z.namelist()}
            if len(tops) != 1:
                raise RuntimeError(f"expected one top folder in the archive, found {sorted(tops)[:5]}")
            z.extractall(tmp_dir)     # zipfile drops absolute paths and '..' parts
            commit = z.comment.decode("ascii", "replace").strip()
        top = os.path.join(tmp_dir, tops.pop())
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            with open(os.path.join(top, ".commit"), "w") as f:
                f.write(commit + "\n")
        os.replace(top, dest)
    except Exception as e:
        raise RuntimeError(f"{hub}: fetching its code from {url} failed ({type(e).__name__}: {e})") from None
    finally:
        if os.path.exists(tmp_zip):
            os.remove(tmp_zip)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest


def load_structure_models(device, raw=None):
    return load_depth_model(device, raw), load_normal_model(device, raw)


# DSINE predicts normals in the OpenCV camera frame (x right, y down, z into the scene); the raw layout (and
# ToyZoo) uses OpenGL's (x right, y up, z toward the viewer), so y and z flip.
DSINE_TO_RAW = (1.0, -1.0, -1.0)


def predict_structure(images, models, batch_size=16):
    """uint8 keyframes -> (depth uint16 list, normals uint8 list), 224x224 each."""
    import torch
    from PIL import Image
    depth_model, normal_model = models
    pil = [Image.fromarray(im) for im in images]
    depths = []
    for out in depth_model(pil, batch_size=batch_size):
        disp = out["predicted_depth"].squeeze().float()
        disp = torch.nn.functional.interpolate(disp[None, None], size=(FRAME_SIZE, FRAME_SIZE),
                                               mode="bilinear", align_corners=False)[0, 0]
        depths.append(disparity_to_depth_u16(disp.cpu().numpy()))
    normals = []
    with torch.inference_mode():
        for im in images:
            n = normal_model.infer_cv2(np.ascontiguousarray(im[:, :, ::-1]))[0]  # DSINE takes BGR
            n = torch.as_tensor(n).float().cpu()       # the predictor answers on its own device
            if n.shape[-1] == 3:
                n = n.permute(2, 0, 1)
            n = torch.nn.functional.interpolate(n[None], size=(FRAME_SIZE, FRAME_SIZE), mode="bilinear",
                                                align_corners=False)[0]
            n = torch.nn.functional.normalize(n, dim=0) * torch.tensor(DSINE_TO_RAW)[:, None, None]
            normals.append(normals_to_u8(n.cpu().numpy()))
    return depths, normals


def write_structure(raw, rows, mode, device="cpu", batch_size=16):
    """Write depth_XX.png / normal_XX.png for every keyframe of every row and set row['depths'],
    row['normals'], row['structure']. mode: 'dav2_dsine' (the real pseudo-labelers), 'flat' (constant
    placeholders, flagged 'flat-placeholder' in the manifest), 'auto' (dav2_dsine when installed, else
    flat with a warning), 'none' (no maps; tokenize_all.py then has nothing to tokenize for depth/normals)."""
    from tqdm import tqdm
    if mode == "auto":
        mode = "dav2_dsine" if structure_available() else "flat"
        if mode == "flat":
            print("WARNING: Depth-Anything-V2 / DSINE are not installed (pip install -r requirements-extra.txt), or "
                  "there is no GPU (DSINE's hub entry needs CUDA)."
                  "\nWARNING: writing FLAT PLACEHOLDER depth and normal maps, flagged structure='flat-placeholder'"
                  " in the manifest. They carry no information; use --pseudo_labels=dav2_dsine for real labels.",
                  file=sys.stderr)
    if mode == "none":
        for row in rows:
            row["depths"], row["normals"], row["structure"] = None, None, None
        return rows
    models = load_structure_models(device, raw) if mode == "dav2_dsine" else None
    flat_d = np.full((FRAME_SIZE, FRAME_SIZE), FLAT_DEPTH, np.uint16)
    flat_n = np.broadcast_to(normals_to_u8(np.array(FLAT_NORMAL)[:, None, None]), (FRAME_SIZE, FRAME_SIZE, 3))
    tag = "dav2_dsine" if mode == "dav2_dsine" else "flat-placeholder"
    for row in tqdm(rows, desc=f"structure ({tag})", unit="clip"):
        cid = row["clip_id"]
        dpaths = [f"clips/{cid}/depth_{i:02d}.png" for i in range(RAW_VIEWS)]
        npaths = [f"clips/{cid}/normal_{i:02d}.png" for i in range(RAW_VIEWS)]
        marker = os.path.join(rawdata.clip_dir(raw, cid), "structure.txt")
        have = os.path.exists(marker) and open(marker).read().strip() == tag
        if not (have and all(os.path.exists(os.path.join(raw, p)) for p in dpaths + npaths)):
            if mode == "flat":
                depths, normals = [flat_d] * RAW_VIEWS, [np.ascontiguousarray(flat_n)] * RAW_VIEWS
            else:
                images = [rawdata.read_png(os.path.join(raw, p)) for p in row["frames"]]
                depths, normals = predict_structure(images, models, batch_size)
            for p, d in zip(dpaths, depths):
                rawdata.write_png(os.path.join(raw, p), d)
            for p, n in zip(npaths, normals):
                rawdata.write_png(os.path.join(raw, p), n)
            rawdata.write_text(marker, tag + "\n")
        row["depths"], row["normals"], row["structure"] = dpaths, npaths, tag
    return rows


# ---------------------------------------------------------------------------------------------------
# what was removed, and why


class Removals:
    """Every candidate a stage drops, one record each: clip id, stage (select, invalid, dedup, download,
    bad_file, too_short, pann, clip, vad), the reason, and the file / score / threshold where there is one.
    finish() writes them to removed.jsonl beside the manifest (the only writer of that file); `counts` are
    the dataset table's "removed at" column."""

    def __init__(self):
        self.records, self.counts = [], {}

    def count(self, key, n=0):
        """Make a stage's count show in the table even when it removed nothing."""
        self.counts[key] = self.counts.get(key, 0) + n

    def add(self, key, clip_id, stage, reason, **more):
        self.count(key, 1)
        self.records.append(dict(clip_id=clip_id, stage=stage, reason=reason,
                                 **{k: v for k, v in more.items() if v is not None}))

    def write(self, raw):
        path = os.path.join(raw, "removed.jsonl")
        rawdata.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        return path


class TooFewClips(ValueError):
    """Too few clips got through (--min_success): the message is one line with the count and the reason."""


# the commonest failures, as they read in yt-dlp's / ffmpeg's messages -> (what happened, a network problem?)
FAILURE_KINDS = (
    (("failed to resolve", "name or service not known", "temporary failure in name resolution",
      "nodename nor servname", "getaddrinfo failed", "no address associated"), "failed to resolve the host", True),
    (("network is unreachable", "no route to host"), "found no route to the host", True),
    (("connection refused",), "were refused a connection", False),
    (("timed out",), "timed out", False),
    (("private video",), "are private videos", False),
    (("confirm you're not a bot", "confirm you’re not a bot"), "were stopped by YouTube's bot check (sign in)", False),
    (("sign in to confirm your age",), "are age-restricted", False),
    (("not available in your country",), "are blocked in this country", False),
    (("video unavailable", "has been removed", "account associated with this video"), "are unavailable videos", False),
    (("yt-dlp is not installed",), "could not start: yt-dlp is not installed (pip install yt-dlp)", False),
)


def failure_kind(reason):
    """A failure message -> (a short phrase that follows "N of M", whether it says there is no network)."""
    low = reason.lower()
    for needles, phrase, offline in FAILURE_KINDS:
        if any(n in low for n in needles):
            return phrase, offline
    m = re.search(r"http error (\d{3})", low)
    if m:
        return f"got HTTP error {m.group(1)}", False
    short = re.sub(r"^(\w+: )?(error: )?(\[\w+\] )?([\w-]+: )?", "", reason.strip(), flags=re.I)
    return "failed: " + short.split(" (")[0][:120], False


def check_success(raw, removed, attempted, got, min_success):
    """Stop the run (TooFewClips, after writing removed.jsonl) when no clip, or fewer than min_success of
    those attempted, got through download and decoding: a dataset that silently holds nothing only fails
    later, somewhere else."""
    if got > 0 and got >= min_success * attempted:
        return
    path = removed.write(raw)
    failed = [r for r in removed.records if r["stage"] in ("invalid", "download", "bad_file")]
    if not failed:
        raise TooFewClips(f"nothing to prepare: no clip of the selected classes in the source (see {path})")
    kinds = {}
    for r in failed:
        kinds.setdefault(failure_kind(r["reason"]) if r["stage"] != "invalid" else ("are invalid rows", False),
                         []).append(r)
    (phrase, offline), worst = max(kinds.items(), key=lambda kv: len(kv[1]))
    example = worst[0].get("file") or worst[0].get("row") or worst[0]["clip_id"]
    raise TooFewClips(f"{'no network: ' if offline else ''}{len(worst)} of {attempted} {phrase} (e.g. {example}); "
                      f"{got} of {attempted} clips got through, fewer than --min_success={min_success:g}; "
                      f"every failure is listed in {path}")


# ---------------------------------------------------------------------------------------------------
# split and the dataset table


def split_rows(rows, seed=1337):
    """Deterministic 80/10/10 split stratified by class x source, grouped by video id (so a video never
    spans two splits; all 10 keyframes of a clip live in its row). Sets row['split'] in place. A dataset
    too small to give val and test a clip each (fewer than 3 videos) is told so."""
    strata = [(r["class"], r["source"]) for r in rows]
    groups = [r.get("video_id", r["clip_id"]) for r in rows]
    for r, s in zip(rows, rawdata.stratified_split(strata, seed=seed, groups=groups)):
        r["split"] = s
    where = {}
    for r, g in zip(rows, groups):
        where.setdefault(g, set()).add(r["split"])
    leaked = [g for g, s in where.items() if len(s) > 1]
    assert not leaked, f"video ids in two splits: {leaked[:5]}"
    empty = [s for s in SPLITS if not any(r["split"] == s for r in rows)]
    if rows and empty:
        print(f"WARNING: {len(where)} video(s) are too few to give every split a clip: {' and '.join(empty)} "
              f"stay empty; add clips (3 videos at the least, 10 per class for a real 80/10/10) and rerun",
              file=sys.stderr)
    return rows


def dataset_table(rows, removed):
    """Counts per class / source / split and the number removed at each filter."""
    def count(key):
        out = {}
        for r in rows:
            out.setdefault(r[key], {s: 0 for s in SPLITS})[r["split"]] += 1
        return {k: dict(v, total=sum(v.values())) for k, v in sorted(out.items())}
    splits = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    return dict(clips=len(rows), splits=splits, per_class=count("class"), per_source=count("source"),
                removed=removed)


def table_markdown(table):
    lines = [f"# dataset: {table['clips']} clips, " + " / ".join(f"{table['splits'][s]} {s}" for s in SPLITS), ""]
    for title, key in (("class", "per_class"), ("source", "per_source")):
        lines += [f"| {title} | " + " | ".join(SPLITS) + " | total |", "|---" * (len(SPLITS) + 2) + "|"]
        for k, v in table[key].items():
            lines.append(f"| {k} | " + " | ".join(str(v[s]) for s in SPLITS) + f" | {v['total']} |")
        lines.append("")
    lines += ["| removed at | clips |", "|---|---|"] + [f"| {k} | {v} |" for k, v in table["removed"].items()]
    if table.get("removed_list"):
        lines += ["", f"Every removed clip, with its stage, reason, file, score and threshold: "
                      f"[{table['removed_list']}]({table['removed_list']})"]
    return "\n".join(lines) + "\n"


def finish(raw, rows, removed, seed):
    """Split, write manifest.jsonl, removed.jsonl and dataset_table.json/.md, print the table and the
    clips rejected for a bad file or row (file and reason)."""
    rows = split_rows(sorted(rows, key=lambda r: r["clip_id"]), seed)
    for r in rows:
        for k in rawdata.ROW_FIELDS:
            r.setdefault(k, None)
    removed.write(raw)
    rawdata.write_manifest(os.path.join(raw, "manifest.jsonl"), rows)
    table = dataset_table(rows, removed.counts)
    table["removed_list"] = "removed.jsonl"
    for name, text in (("dataset_table.json", json.dumps(table, indent=2)), ("dataset_table.md", table_markdown(table))):
        rawdata.write_text(os.path.join(raw, name), text)
    print(table_markdown(table))
    rejected = [r for r in removed.records if r["stage"] in ("invalid", "bad_file")]
    if rejected:
        print(f"rejected {len(rejected)} (file or row: reason):")
        for r in rejected[:50]:
            print(f"  {r.get('file') or r.get('row') or r['clip_id']}: {r['reason']}")
        if len(rejected) > 50:
            print(f"  ... {len(rejected) - 50} more")
    print(f"wrote {len(rows)} clips to {raw}/manifest.jsonl; {len(removed.records)} removed, each with its "
          f"stage and reason, in {raw}/removed.jsonl")
    if not rows:  # the next command would only fail on an empty dataset: stop here and say where they went
        late = collections.Counter(r["stage"] for r in removed.records if r["stage"] in ORACLES + ("too_short",))
        raise TooFewClips(f"no clip is left: all {sum(late.values())} that got through were removed ("
                          + ", ".join(f"{k}: {v}" for k, v in late.most_common()) + f"); see {raw}/removed.jsonl")
    return rows, table


# ---------------------------------------------------------------------------------------------------
# sources


def web_candidates(args, dl_dir, classes, sources, removed):
    """Read the AudioSet / VGGSound lists, select classes. Returns the candidates."""
    cands = []
    if "audioset" in sources:
        paths = args.audioset_csvs.split(",") if args.audioset_csvs else [
            fetch_source_list(AUDIOSET_URL.format(n), os.path.join(dl_dir, "lists", f"{n}_segments.csv"))
            for n in AUDIOSET_LISTS]
        segs = [s for p in paths for s in parse_audioset_csv(p)]
        removed.count("audioset_ambiguous_class")
        picked, _ = select_audioset(segs, classes, removed)
        cands += picked
    if "vggsound" in sources:
        path = args.vggsound_csv or fetch_source_list(VGGSOUND_URL, os.path.join(dl_dir, "lists", "vggsound.csv"))
        cands += select_vggsound(parse_vggsound_csv(path), classes)
    return cands


def cap_per_class(cands, max_per_class, seed):
    """Keep at most max_per_class candidates per class, chosen by a seeded shuffle (a pilot run)."""
    if not max_per_class:
        return cands
    rng = np.random.default_rng(seed)
    out = []
    for c in sorted({x["cls"] for x in cands}):
        mine = sorted((x for x in cands if x["cls"] == c), key=lambda x: (x["youtube_id"], x["start_s"]))
        out += [mine[i] for i in sorted(rng.permutation(len(mine))[:max_per_class])]
    return out


def build_web(args, raw, cands, removed, fetch=fetch_ytdlp, oracle_models=None):
    """Candidates -> checked, deduplicated, downloaded, extracted, oracle-filtered, split, pseudo-labelled rows."""
    from tqdm import tqdm
    removed.count("invalid_row")
    cands = check_candidates(cands, removed)
    n_invalid = removed.counts["invalid_row"]
    removed.count("dedup_merged")
    removed.count("dedup_conflicting_class")
    cands, merged, conflicting = dedup(cands, removed)
    dl_dir = os.path.join(os.path.dirname(raw), "download")
    jobs = [dict(c, clip_id=clip_id_for(c["youtube_id"], c["start_s"])) for c in cands]
    stats = download_all(jobs, os.path.join(dl_dir, "video"), fetch=fetch, workers=args.download_workers,
                         log_path=os.path.join(dl_dir, "failures.jsonl"), retry_failed=args.retry_failed)
    print(f"download: {stats['ok']} new, {stats['skipped']} already on disk, {stats['failed']} failed, "
          f"{stats['known_failed']} known unavailable (log: {dl_dir}/failures.jsonl)")
    removed.count("download_failed")
    for e in sorted(stats["failures"] + stats["known"], key=lambda e: e["clip_id"]):
        removed.add("download_failed", e["clip_id"], "download", e["error"], permanent=e.get("permanent"))
    require_ffmpeg()
    rows = []
    removed.count("bad_file")
    removed.count("too_short_refused")
    for job in tqdm(jobs, desc="extract", unit="clip"):
        video = os.path.join(dl_dir, "video", job["clip_id"] + ".mp4")
        if not os.path.exists(video):
            continue
        try:
            media = extract_video_clip(raw, job["clip_id"], video, args.min_length_policy)
        except TooShort as e:
            removed.add("too_short_refused", job["clip_id"], "too_short", str(e), file=video, score=round(e.seconds, 3),
                        threshold=round(AUDIO_WINDOW / RAW_SR, 3))
            continue
        except BadFile as e:
            if args.strict:
                raise BadFile(e.file, f"{e.reason} (--strict=True stops at the first bad file)") from None
            print(f"skipping {job['clip_id']}: {e}", file=sys.stderr)
            removed.add("bad_file", job["clip_id"], "bad_file", e.reason, file=e.file)
            continue
        rows.append(dict(clip_id=job["clip_id"], video_id=job["youtube_id"], **{"class": job["cls"]},
                         source=job["source"], caption=f"a photo of a {job['cls']}", **media,
                         origin=dict(youtube_id=job["youtube_id"], start_s=job["start_s"], end_s=job["end_s"],
                                     labels=job["origin_labels"]),
                         published_oracles=job.get("published", {})))
    n_short = removed.counts["too_short_refused"]
    check_success(raw, removed, n_invalid + len(jobs), len(rows) + n_short, args.min_success)
    return filter_and_finish(args, raw, rows, removed, oracle_models)


def filter_and_finish(args, raw, rows, removed, oracle_models=None):
    skip = set(args.skip_oracles)
    device = pick_device(args.device)
    rows = run_oracles(raw, rows, skip, device, args.pann_checkpoint, oracle_models)
    thresholds = dict(pann=args.pann_threshold, clip=args.clip_threshold, vad=args.vad_max_voiced)
    kept = []
    for o in ORACLES:
        removed.count(f"oracle_{o}")
    for r in rows:
        fails = oracle_failures(r, thresholds)
        if r.get("published_oracles"):
            r["published_below_threshold"] = oracle_failures(
                dict(oracles={}, published_oracles=r["published_oracles"]), thresholds)
        if fails:  # counted at the first filter it fails, in pipeline order; the record names them all
            o, th = fails[0], thresholds[fails[0]]
            published = not isinstance(r["oracles"].get(o), (int, float))
            score = r["published_oracles"][o] if published else r["oracles"][o]
            why = (f"Silero VAD calls {score:g} of the clip speech, more than {th:g}" if o == "vad" else
                   f"{o} score {score:g} is below the threshold {th:g}")
            removed.add(f"oracle_{o}", r["clip_id"], o, why + (" (the list's published score)" if published else ""),
                        score=score, threshold=th, failed=fails, scores=r["oracles"], published=published or None,
                        source=r["source"], **{"class": r["class"]})
        else:
            kept.append(r)
    kept = write_structure(raw, kept, args.pseudo_labels, device, args.batch_size)
    return finish(raw, kept, removed, args.seed)


def find_folder_clips(root, bad=None):
    """root/<class>/<clip> where a clip is a video file or a folder with one audio file + 1..N images.
    Returns [(class, clip name, kind, paths)], sorted. Anything else is a clear error naming the file, or,
    when `bad` is a list, appended to it as (class, clip name, file, reason) and skipped."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder (--source=folder wants --path=DIR with one sub-folder per class)")
    clips = []

    def refuse(cls, name, path, reason):
        if bad is None:
            raise BadFile(path, reason)
        bad.append((cls, name, path, reason))

    class_dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root}: no class sub-folders found (expected {root}/<class>/<clip>)")
    for cls in class_dirs:
        cdir = os.path.join(root, cls)
        for name in sorted(os.listdir(cdir)):
            if name.startswith("."):
                continue
            p = os.path.join(cdir, name)
            ext = os.path.splitext(name)[1].lower()
            if os.path.isdir(p):
                files = sorted(f for f in os.listdir(p) if not f.startswith("."))
                audios = [os.path.join(p, f) for f in files if os.path.splitext(f)[1].lower() in AUDIO_EXTS + VIDEO_EXTS]
                images = [os.path.join(p, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
                if len(audios) != 1 or not images:
                    refuse(cls, name, p, f"a clip folder needs exactly one audio file ({', '.join(AUDIO_EXTS)}) and at "
                                         f"least one image ({', '.join(IMAGE_EXTS)}); found {len(audios)} audio, "
                                         f"{len(images)} images")
                    continue
                clips.append((cls, name, "folder", dict(audio=audios[0], images=images)))
            elif ext in VIDEO_EXTS:
                clips.append((cls, os.path.splitext(name)[0], "video", dict(video=p)))
            elif ext in AUDIO_EXTS:
                refuse(cls, os.path.splitext(name)[0], p,
                       "an audio file alone is not a clip; put it in a folder with at least one image")
            else:
                print(f"ignoring {p}: not a video ({', '.join(VIDEO_EXTS)}) or clip folder", file=sys.stderr)
    if not clips and not bad:
        raise ValueError(f"{root}: no clips found under the class folders")
    return clips


def safe_id(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def folder_clip_media(raw, cid, paths, root, policy):
    """A clip folder (one audio file + 1..N images) -> its row's media fields, written under clips/<cid>/."""
    media = cached_media(raw, cid, policy)
    if media is not None:
        return media
    audio = decode_audio(paths["audio"])
    duration = len(audio) / RAW_SR
    padded = pad_audio(audio, policy, paths["audio"])
    imgs = paths["images"]
    # spread N images over the 10 views in order (N < 10 repeats them, N > 10 subsamples)
    pick = [min(len(imgs) - 1, i * len(imgs) // RAW_VIEWS) for i in range(RAW_VIEWS)]
    frames = {j: load_image(imgs[j]) for j in sorted(set(pick))}
    write_clip(raw, cid, padded, [frames[j] for j in pick])
    return save_media(raw, cid, dict(
        audio=f"clips/{cid}/audio.wav", frames=[f"clips/{cid}/frame_{i:02d}.png" for i in range(RAW_VIEWS)],
        keyframe_times=keyframe_times(duration), duration_s=round(duration, 4),
        origin=dict(path=os.path.relpath(os.path.dirname(paths["audio"]), root),
                    audio=os.path.basename(paths["audio"]), view_images=[os.path.basename(imgs[j]) for j in pick]),
        images_repeated=len(imgs) < RAW_VIEWS, n_images=len(imgs)))


def build_folder(args, raw, oracle_models=None):
    """Your own clips: every clip that can be read goes through; a bad one (an undecodable or empty audio file,
    an unreadable image, a clip folder without a picture) is skipped and listed with its file and reason, unless
    --strict=True, which stops at the first. A rerun reads only the clips not finished yet."""
    from tqdm import tqdm
    require_ffmpeg()
    removed = Removals()
    for key in ("bad_file", "too_short_refused"):
        removed.count(key)
    bad = None if args.strict else []
    try:
        found = find_folder_clips(args.path, bad)
    except BadFile as e:
        raise BadFile(e.file, f"{e.reason} (--strict=True stops at the first bad file)") from None
    for cls, name, path, reason in bad or []:
        removed.add("bad_file", safe_id(f"{cls}__{name}"), "bad_file", reason, file=path, **{"class": cls})
    rows, used = [], set()
    for cls, name, kind, paths in tqdm(found, desc="folder clips", unit="clip"):
        cid = safe_id(f"{cls}__{name}")
        while cid in used:  # "a b" and "a_b" would share a folder: the later one gets a suffix
            cid += "_"
        used.add(cid)
        row = {"clip_id": cid, "class": cls, "source": "folder", "caption": f"a photo of a {cls}"}
        try:
            if kind == "video":
                row.update(extract_video_clip(raw, cid, paths["video"], args.min_length_policy))
                row["origin"] = dict(path=os.path.relpath(paths["video"], args.path))
            else:
                row.update(folder_clip_media(raw, cid, paths, args.path, args.min_length_policy))
        except TooShort as e:
            print(f"refused: {e}", file=sys.stderr)
            removed.add("too_short_refused", cid, "too_short", str(e), file=paths.get("video", paths.get("audio")),
                        score=round(e.seconds, 3), threshold=round(AUDIO_WINDOW / RAW_SR, 3), **{"class": cls})
            continue
        except BadFile as e:
            if args.strict:
                raise BadFile(e.file, f"{e.reason} (--strict=True stops at the first bad file)") from None
            removed.add("bad_file", cid, "bad_file", e.reason, file=e.file, **{"class": cls})
            continue
        row["padded"] = row["duration_s"] * RAW_SR < AUDIO_WINDOW
        rows.append(row)
    n_bad = removed.counts["bad_file"]
    check_success(raw, removed, len(rows) + removed.counts["too_short_refused"] + n_bad,
                  len(rows) + removed.counts["too_short_refused"], args.min_success)
    return filter_and_finish(args, raw, rows, removed, oracle_models)


# ---------------------------------------------------------------------------------------------------
# command line


# settings (a config file and/or --key=value, configurator.py; --help lists them)
dataset = None                # name under data/ (None = toyzoo / animals / the folder or list name)
data_root = "data"
source = "toyzoo"             # toyzoo | audioset,vggsound (either or both) | manifest | folder
path = ""                     # the clip list CSV (--source=manifest) or the folder (--source=folder)
seed = 1337
classes = ""                  # comma-separated subset of classes ('' = all)
# toyzoo
clips_per_class = 100
difficulty = 0.25
workers = 2
# web
audioset_csvs = ""            # local AudioSet segment CSVs, comma-separated ('' = download)
vggsound_csv = ""             # local vggsound.csv ('' = download)
max_per_class = 0             # cap candidates per class (0 = all), for a pilot run
download_workers = 8
retry_failed = False          # retry videos the log marks private/removed
url_template = YOUTUBE_URL    # the page yt-dlp fetches for a clip; {youtube_id} is filled in (a mirror, or a local server in tests)
# web and folder
min_success = 0.5             # fail (exit 1, one line with the count and the commonest reason) when fewer than this share of
                              # the clips got through download and decoding; no clip at all always fails
strict = False                # stop at the first bad file instead of skipping and listing it in removed.jsonl
# oracles
skip_oracles = "auto"         # comma-separated subset of pann,clip,vad to skip (auto: none for web sources, all for folder)
pann_threshold = PANN_THRESHOLD
clip_threshold = CLIP_THRESHOLD
vad_max_voiced = VAD_MAX_VOICED
pann_checkpoint = PANN_CHECKPOINT
# clips
min_length_policy = "pad"     # clips shorter than one 3.41 s window: pad with silence (true length kept) or refuse
pseudo_labels = "auto"        # auto | dav2_dsine | flat | none
batch_size = 16               # keyframes per pseudo-labeller batch
device = "auto"
DEFAULTS = configurator.settings(globals())
CHOICES = {"min_length_policy": ("pad", "refuse"), "pseudo_labels": ("auto", "dav2_dsine", "flat", "none")}


def check_settings(args):
    """Derived settings (sources, the oracles skipped) and the checks a setting's type cannot make."""
    args.sources = [s.strip() for s in args.source.split(",") if s.strip()]
    args.dataset = None if args.dataset is None else str(args.dataset)   # --dataset=2024 is the name '2024'
    if args.skip_oracles == "auto":
        args.skip_oracles = "pann,clip,vad" if args.sources == ["folder"] else ""
    args.skip_oracles = [s.strip() for s in args.skip_oracles.split(",") if s.strip()]
    bad = [s for s in args.skip_oracles if s not in ORACLES]
    if bad:
        raise configurator.ConfigError(f"--skip_oracles: unknown {bad}; choose from {ORACLES}")
    if "{youtube_id}" not in args.url_template:
        raise configurator.ConfigError(f"--url_template={args.url_template!r} has no {{youtube_id}} to fill in")
    if not 0.0 <= args.min_success <= 1.0:
        raise configurator.ConfigError(f"--min_success={args.min_success} is not a share in [0, 1]")
    if args.dataset is not None and not rawdata.SAFE_NAME.fullmatch(str(args.dataset)):
        raise configurator.ConfigError(f"--dataset={args.dataset!r}: a dataset name is one folder under "
                                       f"{args.data_root}/ (1-200 of A-Z a-z 0-9 _ . -, not starting with a dot)")


def parse_args(argv=None):
    """The settings with argv applied -> a namespace; a bad setting exits with one line naming it."""
    try:
        args = types.SimpleNamespace(**configurator.apply_overrides(DEFAULTS, sys.argv[1:] if argv is None else argv))
        configurator.check_choices(vars(args), CHOICES)
        check_settings(args)
    except configurator.ConfigError as e:
        raise SystemExit(f"prepare_data.py: {e}") from None
    return args


def dataset_name_from(path):
    """The default dataset name for --path: the folder's or list's own name, made safe ('recordings/..' is the
    folder above, never a way out of data/)."""
    name = safe_id(os.path.splitext(os.path.basename(os.path.abspath(path)))[0]).lstrip(".")
    if not rawdata.SAFE_NAME.fullmatch(name):
        raise SystemExit(f"--path={path}: no dataset name can be made from it; pass --dataset=NAME")
    return name


def main(argv=None, fetch=None, oracle_models=None):
    args = parse_args(argv)
    src = args.sources
    if src == ["toyzoo"]:
        from toyzoo import build_toyzoo  # written beside this file; imported lazily
        args.dataset = args.dataset or "toyzoo"
        raw = rawdata.raw_dir(args.dataset, args.data_root)
        os.makedirs(raw, exist_ok=True)
        classes = args.classes.split(",") if args.classes else None
        rows = build_toyzoo(raw, clips_per_class=args.clips_per_class, difficulty=args.difficulty, seed=args.seed,
                            workers=args.workers, classes=classes)  # writes its own manifest.jsonl
        table = dataset_table(rows, removed={})
        print(table_markdown(table))
        return rows, table
    if src in (["manifest"], ["folder"]):
        if not args.path:
            raise SystemExit(f"--source={src[0]} needs --path=...")
        args.dataset = args.dataset or dataset_name_from(args.path)
    elif set(src) <= {"audioset", "vggsound"}:
        args.dataset = args.dataset or "animals"
    else:
        raise SystemExit(f"--source={args.source}: choose toyzoo, audioset and/or vggsound, manifest, or folder")
    raw = rawdata.raw_dir(args.dataset, args.data_root)
    os.makedirs(os.path.join(raw, "clips"), exist_ok=True)
    if src == ["folder"]:
        return build_folder(args, raw, oracle_models)
    fetch = fetch or functools.partial(fetch_ytdlp, url_template=args.url_template)
    removed = Removals()
    if src == ["manifest"]:
        cands = parse_clip_list(args.path)
        if args.classes:  # a published list is rebuilt whole unless --classes picks some of its classes
            keep = set(args.classes.split(","))
            removed.count("class_not_selected")
            for c in cands:
                if c["cls"] not in keep:
                    removed.add("class_not_selected", clip_id_for(c["youtube_id"], c["start_s"]), "select",
                                f"class {c['cls']!r} not in --classes", row=c.get("row"))
            cands = [c for c in cands if c["cls"] in keep]
    else:
        classes = args.classes.split(",") if args.classes else sorted(CLASS_MAP)
        unknown = [c for c in classes if c not in CLASS_MAP]
        if unknown:
            raise SystemExit(f"--classes: {unknown} not in the class map ({', '.join(sorted(CLASS_MAP))})")
        cands = web_candidates(args, os.path.join(os.path.dirname(raw), "download"), classes, src, removed)
    cands = cap_per_class(cands, args.max_per_class, args.seed)
    return build_web(args, raw, cands, removed, fetch=fetch, oracle_models=oracle_models)


if __name__ == "__main__":
    try:
        main()
    except (TooFewClips, BadFile) as e:  # one line that says what to do, not a traceback
        sys.exit(f"prepare_data.py: {e}")
