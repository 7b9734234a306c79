"""
prepare_data.py: get raw paired clips (audio + 10 keyframes + depth + normals) into data/<dataset>/raw/,
in the layout of rawdata.py, so tokenize_all.py and everything after it work unchanged.

    python prepare_data.py                                         # ToyZoo, synthetic, offline (default)
    python prepare_data.py --source=audioset,vggsound              # the report's 11 animal classes from the web
    python prepare_data.py --source=manifest --path=clips.csv      # re-download a published clip list exactly
    python prepare_data.py --source=folder --path=my_recordings/   # your own clips, one sub-folder per class

The web pipeline (audioset / vggsound / manifest), top to bottom:
  1. read the source CSVs and select the classes of CLASS_MAP (below)
  2. deduplicate across sources: same video + overlapping time range is one clip ("audioset+vggsound")
  3. download only the 10 s segment with yt-dlp, a bounded thread pool, resumable; failures are logged to
     download/failures.jsonl and counted, never fatal
  4. extract 24 kHz mono audio and 10 keyframes (one per second, centre-cropped to 224x224) with ffmpeg
  5. three oracles, each skippable (--skip_oracles=pann,clip,vad) with the manifest saying "skipped":
     PANNs Cnn14 score >= 0.30 on the class's AudioSet indices, CLIP cosine >= 0.25 for "a photo of a {class}"
     (best of the 10 keyframes), Silero VAD rejecting any human speech
  6. a deterministic split, 80/10/10 stratified by class x source, grouped by video id (no video in two splits)
  7. depth / normal pseudo-labels per keyframe (Depth-Anything-V2, DSINE), or flagged flat placeholders
  8. manifest.jsonl + dataset_table.json/.md: counts per class / source / split and removed at each filter
Every stage skips what is already on disk, so rerunning the same command resumes.

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
import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

import rawdata
from modalities import AUDIO_WINDOW  # samples in one 3.41 s model window
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
# written, so the ref is its branch and the hub code's sha256 is recorded on first use and checked after
NORMAL_HUB = ("hugoycj/DSINE-hub:main", "DSINE")
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


def select_audioset(segments, classes):
    """Assign each segment to the one class whose selecting ids it carries. Returns (candidates,
    n_ambiguous): a segment selecting two classes is dropped."""
    picked, ambiguous = [], 0
    for seg in segments:
        labels = set(seg["labels"])
        hit = [c for c in classes if labels & set(CLASS_MAP[c]["audioset"])]
        if len(hit) > 1:
            ambiguous += 1
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
    optional oracle scores pann_score / clip_score / vad_voiced_frac) -> candidates."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: clip list not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        need = {"youtube_id", "start_s", "class"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: a clip list needs the columns {sorted(need)}, has {reader.fieldnames}")
        out = []
        for i, r in enumerate(reader, 2):
            try:
                start = float(r["start_s"])
            except ValueError:
                raise ValueError(f"{path}:{i}: start_s {r['start_s']!r} is not a number") from None
            published = {}
            for key, name in (("pann_score", "pann"), ("clip_score", "clip"), ("vad_voiced_frac", "vad")):
                if r.get(key) not in (None, ""):
                    published[name] = float(r[key])
            out.append(dict(youtube_id=r["youtube_id"].strip(), start_s=start,
                            end_s=float(r["end_s"]) if r.get("end_s") else start + CLIP_SECONDS,
                            cls=r["class"].strip(), source=(r.get("source") or "manifest").strip(),
                            published=published, origin_labels=[]))
    return out


def dedup(candidates):
    """Same video + overlapping time range = one clip. Overlapping segments of the same class merge (their
    sources join, e.g. 'audioset+vggsound', the earliest start is kept); overlapping segments of different
    classes are all dropped, since the clip's label is in doubt. Returns (kept, n_merged, n_conflicting)."""
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
                continue
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
    tmp = rawdata.atomic_path(path)
    with open(tmp, "wb") as f:
        f.write(r.content)
    os.replace(tmp, path)
    return path


PERMANENT_ERRORS = ("private video", "video unavailable", "has been removed", "not available in your country",
                    "account associated with this video has been terminated", "copyright", "sign in to confirm your age")


def fetch_ytdlp(youtube_id, start_s, end_s, out_path):
    """Download only [start_s, end_s] of a YouTube video to out_path (mp4) with yt-dlp. Raises RuntimeError
    with yt-dlp's message on failure."""
    try:
        import yt_dlp  # noqa: F401  (only to give a clear error; the CLI below is the same package)
    except ImportError:
        raise RuntimeError("yt-dlp is not installed: pip install -r requirements-extra.txt") from None
    tmp = rawdata.atomic_path(out_path)
    cmd = [sys.executable, "-m", "yt_dlp", "--quiet", "--no-warnings", "--no-playlist",
           "--download-sections", f"*{start_s}-{end_s}", "--force-keyframes-at-cuts",
           "-f", "bv*[height<=480]+ba/b[height<=480]/bv*+ba/b", "--merge-output-format", "mp4",
           "-o", tmp, f"https://www.youtube.com/watch?v={youtube_id}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(tmp):
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError((r.stderr or r.stdout or "yt-dlp failed").strip().splitlines()[-1][:300])
    os.replace(tmp, out_path)


def download_all(jobs, out_dir, fetch=fetch_ytdlp, workers=8, log_path=None, retry_failed=False):
    """Download each job {clip_id, youtube_id, start_s, end_s} to out_dir/<clip_id>.mp4 with a bounded
    thread pool. A file already there is skipped (resume). A failure is appended to log_path (one JSON line)
    and counted, never raised. A permanent failure (private / removed video) found in the log is not
    retried unless retry_failed. Returns {'ok', 'skipped', 'failed', 'known_failed', 'failures'}."""
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    log_path = log_path or os.path.join(out_dir, "failures.jsonl")
    known = {}
    if os.path.exists(log_path) and not retry_failed:
        with open(log_path) as f:
            for line in f:
                if line.strip():
                    e = json.loads(line)
                    if e.get("permanent"):
                        known[e["clip_id"]] = e
    stats = dict(ok=0, skipped=0, failed=0, known_failed=0, failures=[])
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
        raise ValueError(f"{path}: ffmpeg could not decode audio ({r.stderr.decode(errors='replace').strip()[-300:]})")
    audio = np.frombuffer(r.stdout, dtype="<f4").copy()
    if audio.size == 0:
        raise ValueError(f"{path}: no audio stream (or zero-length audio)")
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
    raise ValueError(f"{path}: no video frame could be read near t={t:.2f} s "
                     f"({r.stderr.decode(errors='replace').strip()[-300:]})")


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
        raise ValueError(f"{path}: not a readable image ({e})") from None
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
        raise ValueError(f"{name}: {len(audio) / RAW_SR:.2f} s of audio is shorter than the "
                         f"{AUDIO_WINDOW / RAW_SR:.2f} s model window (--min_length_policy=refuse)")
    return np.concatenate([audio, np.zeros(AUDIO_WINDOW - len(audio), np.float32)])


def write_clip(raw, clip_id, audio, frames):
    """Write audio.wav + frame_XX.png of one clip (atomically, file by file). Returns (audio, frames) paths
    relative to raw/."""
    d = os.path.join(raw, "clips", clip_id)
    os.makedirs(d, exist_ok=True)
    rawdata.write_wav(os.path.join(d, "audio.wav"), audio)
    rel_frames = []
    for i, fr in enumerate(frames):
        rawdata.write_png(os.path.join(d, f"frame_{i:02d}.png"), fr)
        rel_frames.append(f"clips/{clip_id}/frame_{i:02d}.png")
    return f"clips/{clip_id}/audio.wav", rel_frames


def clip_done(raw, clip_id):
    d = os.path.join(raw, "clips", clip_id)
    return os.path.exists(os.path.join(d, "audio.wav")) and all(
        os.path.exists(os.path.join(d, f"frame_{i:02d}.png")) for i in range(RAW_VIEWS))


def extract_video_clip(raw, clip_id, media_path, min_length_policy="pad"):
    """A video file -> the clip's audio.wav (24 kHz mono) and 10 keyframes. Returns the row's media fields."""
    audio = decode_audio(media_path)
    duration = len(audio) / RAW_SR
    times = keyframe_times(duration)
    if not clip_done(raw, clip_id):
        frames = video_frames(media_path, times)
        write_clip(raw, clip_id, pad_audio(audio, min_length_policy, media_path), frames)
    return dict(audio=f"clips/{clip_id}/audio.wav",
                frames=[f"clips/{clip_id}/frame_{i:02d}.png" for i in range(RAW_VIEWS)],
                keyframe_times=times, duration_s=round(duration, 4))


# ---------------------------------------------------------------------------------------------------
# the three oracles


def pick_device(device="auto"):
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
    tmp = rawdata.atomic_path(os.path.join(raw, DOWNLOADS_JSON))
    with open(tmp, "w") as f:
        json.dump(have, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(raw, DOWNLOADS_JSON))


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
        tmp = rawdata.atomic_path(dest)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise RuntimeError(f"{name}: download of {url} failed ({e})") from None
        if pinned and sha256_file(tmp) != pinned:
            got = sha256_file(tmp)
            os.remove(tmp)
            raise RuntimeError(f"{name}: {url} gave sha256 {got}, not the pinned {pinned}: refused")
        os.replace(tmp, dest)
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
        cache = os.path.join(raw, "clips", row["clip_id"], "oracles.json")
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
            tmp = rawdata.atomic_path(cache)
            with open(tmp, "w") as f:
                json.dump(dict(scores=scores, info=info), f)
            os.replace(tmp, cache)
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
    try:
        normal = torch.hub.load(repo, entry, local_file_path=weights, source=source, trust_repo=True)
    except Exception as e:
        raise RuntimeError(f"could not load DSINE from torch.hub {repo} ({type(e).__name__}: {e}); pip install "
                           "geffnet and check the network; its entry places the model on CUDA, so it needs a GPU; "
                           "or --pseudo_labels=flat") from None
    repo_dir = repo if source == "local" else os.path.join(
        torch.hub.get_dir(), "_".join([*repo.split(":")[0].split("/"), repo.split(":")[1] if ":" in repo else "main"]))
    hubconf = os.path.join(repo_dir, "hubconf.py")
    if os.path.exists(hubconf):
        check_sha256("dsine_hubconf", hubconf, raw, url=repo)
    if hasattr(normal, "model"):        # the entry picks its device itself: follow the one asked for
        normal.model.to(device)
        if hasattr(normal.model, "pixel_coords"):
            normal.model.pixel_coords = normal.model.pixel_coords.to(device)
        normal.device = torch.device(device)
    return normal


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
        marker = os.path.join(raw, "clips", cid, "structure.txt")
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
            tmp = rawdata.atomic_path(marker)
            with open(tmp, "w") as f:
                f.write(tag + "\n")
            os.replace(tmp, marker)
        row["depths"], row["normals"], row["structure"] = dpaths, npaths, tag
    return rows


# ---------------------------------------------------------------------------------------------------
# split and the dataset table


def split_rows(rows, seed=1337):
    """Deterministic 80/10/10 split stratified by class x source, grouped by video id (so a video never
    spans two splits; all 10 keyframes of a clip live in its row). Sets row['split'] in place."""
    strata = [(r["class"], r["source"]) for r in rows]
    groups = [r.get("video_id", r["clip_id"]) for r in rows]
    for r, s in zip(rows, rawdata.stratified_split(strata, seed=seed, groups=groups)):
        r["split"] = s
    where = {}
    for r, g in zip(rows, groups):
        where.setdefault(g, set()).add(r["split"])
    leaked = [g for g, s in where.items() if len(s) > 1]
    assert not leaked, f"video ids in two splits: {leaked[:5]}"
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
    return "\n".join(lines) + "\n"


def finish(raw, rows, removed, seed):
    """Split, write manifest.jsonl and dataset_table.json/.md, print the table."""
    rows = split_rows(sorted(rows, key=lambda r: r["clip_id"]), seed)
    for r in rows:
        for k in rawdata.ROW_FIELDS:
            r.setdefault(k, None)
    rawdata.write_manifest(os.path.join(raw, "manifest.jsonl"), rows)
    table = dataset_table(rows, removed)
    for name, text in (("dataset_table.json", json.dumps(table, indent=2)), ("dataset_table.md", table_markdown(table))):
        path = os.path.join(raw, name)
        tmp = rawdata.atomic_path(path)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    print(table_markdown(table))
    print(f"wrote {len(rows)} clips to {raw}/manifest.jsonl")
    return rows, table


# ---------------------------------------------------------------------------------------------------
# sources


def web_candidates(args, dl_dir, classes, sources):
    """Read the AudioSet / VGGSound lists, select classes. Returns (candidates, removed counts)."""
    removed = {}
    cands = []
    if "audioset" in sources:
        paths = args.audioset_csvs.split(",") if args.audioset_csvs else [
            fetch_source_list(AUDIOSET_URL.format(n), os.path.join(dl_dir, "lists", f"{n}_segments.csv"))
            for n in AUDIOSET_LISTS]
        segs = [s for p in paths for s in parse_audioset_csv(p)]
        picked, amb = select_audioset(segs, classes)
        removed["audioset_ambiguous_class"] = amb
        cands += picked
    if "vggsound" in sources:
        path = args.vggsound_csv or fetch_source_list(VGGSOUND_URL, os.path.join(dl_dir, "lists", "vggsound.csv"))
        cands += select_vggsound(parse_vggsound_csv(path), classes)
    return cands, removed


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
    """Candidates -> deduplicated, downloaded, extracted, oracle-filtered, split, pseudo-labelled rows."""
    from tqdm import tqdm
    cands, merged, conflicting = dedup(cands)
    removed["dedup_merged"] = merged
    removed["dedup_conflicting_class"] = conflicting
    dl_dir = os.path.join(os.path.dirname(raw), "download")
    jobs = [dict(c, clip_id=clip_id_for(c["youtube_id"], c["start_s"])) for c in cands]
    stats = download_all(jobs, os.path.join(dl_dir, "video"), fetch=fetch, workers=args.download_workers,
                         log_path=os.path.join(dl_dir, "failures.jsonl"), retry_failed=args.retry_failed)
    print(f"download: {stats['ok']} new, {stats['skipped']} already on disk, {stats['failed']} failed, "
          f"{stats['known_failed']} known unavailable (log: {dl_dir}/failures.jsonl)")
    removed["download_failed"] = stats["failed"] + stats["known_failed"]
    require_ffmpeg()
    rows, n_bad = [], 0
    for job in tqdm(jobs, desc="extract", unit="clip"):
        video = os.path.join(dl_dir, "video", job["clip_id"] + ".mp4")
        if not os.path.exists(video):
            continue
        try:
            media = extract_video_clip(raw, job["clip_id"], video, args.min_length_policy)
        except ValueError as e:
            print(f"skipping {job['clip_id']}: {e}", file=sys.stderr)
            n_bad += 1
            continue
        rows.append(dict(clip_id=job["clip_id"], video_id=job["youtube_id"], **{"class": job["cls"]},
                         source=job["source"], caption=f"a photo of a {job['cls']}", **media,
                         origin=dict(youtube_id=job["youtube_id"], start_s=job["start_s"], end_s=job["end_s"],
                                     labels=job["origin_labels"]),
                         published_oracles=job.get("published", {})))
    removed["extract_failed"] = n_bad
    return filter_and_finish(args, raw, rows, removed, oracle_models)


def filter_and_finish(args, raw, rows, removed, oracle_models=None):
    skip = set(args.skip_oracles)
    device = pick_device(args.device)
    rows = run_oracles(raw, rows, skip, device, args.pann_checkpoint, oracle_models)
    thresholds = dict(pann=args.pann_threshold, clip=args.clip_threshold, vad=args.vad_max_voiced)
    kept = []
    for o in ORACLES:
        removed[f"oracle_{o}"] = 0
    for r in rows:
        fails = oracle_failures(r, thresholds)
        if r.get("published_oracles"):
            r["published_below_threshold"] = oracle_failures(
                dict(oracles={}, published_oracles=r["published_oracles"]), thresholds)
        if fails:
            removed[f"oracle_{fails[0]}"] += 1  # counted at the first filter it fails, in pipeline order
        else:
            kept.append(r)
    kept = write_structure(raw, kept, args.pseudo_labels, device, args.batch_size)
    return finish(raw, kept, removed, args.seed)


def find_folder_clips(root):
    """root/<class>/<clip> where a clip is a video file or a folder with one audio file + 1..N images.
    Returns [(class, clip name, kind, paths)], sorted; anything else is a clear error."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder (--source=folder wants --path=DIR with one sub-folder per class)")
    clips = []
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
                    raise ValueError(f"{p}: a clip folder needs exactly one audio file ({', '.join(AUDIO_EXTS)}) and at "
                                     f"least one image ({', '.join(IMAGE_EXTS)}); found {len(audios)} audio, {len(images)} images")
                clips.append((cls, name, "folder", dict(audio=audios[0], images=images)))
            elif ext in VIDEO_EXTS:
                clips.append((cls, os.path.splitext(name)[0], "video", dict(video=p)))
            elif ext in AUDIO_EXTS:
                raise ValueError(f"{p}: an audio file alone is not a clip; put it in a folder with at least one image")
            else:
                print(f"ignoring {p}: not a video ({', '.join(VIDEO_EXTS)}) or clip folder", file=sys.stderr)
    if not clips:
        raise ValueError(f"{root}: no clips found under the class folders")
    return clips


def safe_id(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def build_folder(args, raw, oracle_models=None):
    from tqdm import tqdm
    require_ffmpeg()
    rows, refused = [], 0
    for cls, name, kind, paths in tqdm(find_folder_clips(args.path), desc="folder clips", unit="clip"):
        cid = safe_id(f"{cls}__{name}")
        row = {"clip_id": cid, "class": cls, "source": "folder", "caption": f"a photo of a {cls}"}
        try:
            if kind == "video":
                row.update(extract_video_clip(raw, cid, paths["video"], args.min_length_policy))
                row["origin"] = dict(path=os.path.relpath(paths["video"], args.path))
            else:
                audio = decode_audio(paths["audio"])
                duration = len(audio) / RAW_SR
                padded = pad_audio(audio, args.min_length_policy, paths["audio"])
                imgs = paths["images"]
                # spread N images over the 10 views in order (N < 10 repeats them, N > 10 subsamples)
                pick = [min(len(imgs) - 1, i * len(imgs) // RAW_VIEWS) for i in range(RAW_VIEWS)]
                if not clip_done(raw, cid):
                    frames = {j: load_image(imgs[j]) for j in sorted(set(pick))}
                    write_clip(raw, cid, padded, [frames[j] for j in pick])
                row.update(audio=f"clips/{cid}/audio.wav",
                           frames=[f"clips/{cid}/frame_{i:02d}.png" for i in range(RAW_VIEWS)],
                           keyframe_times=keyframe_times(duration), duration_s=round(duration, 4))
                row["origin"] = dict(path=os.path.relpath(os.path.dirname(paths["audio"]), args.path),
                                     audio=os.path.basename(paths["audio"]),
                                     view_images=[os.path.basename(imgs[j]) for j in pick])
                row["images_repeated"] = len(imgs) < RAW_VIEWS
                row["n_images"] = len(imgs)
        except ValueError as e:
            if args.min_length_policy == "refuse" and "shorter than" in str(e):
                print(f"refused: {e}", file=sys.stderr)
                refused += 1
                continue
            raise
        row["padded"] = row["duration_s"] * RAW_SR < AUDIO_WINDOW
        rows.append(row)
    return filter_and_finish(args, raw, rows, dict(too_short_refused=refused), oracle_models)


# ---------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help="name under data/ (default: toyzoo / animals / the folder or list name)")
    p.add_argument("--data_root", default="data")
    p.add_argument("--source", default="toyzoo", help="toyzoo | audioset,vggsound (either or both) | manifest | folder")
    p.add_argument("--path", default=None, help="the clip list CSV (--source=manifest) or the folder (--source=folder)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--classes", default=None, help="comma-separated subset of classes (default: all)")
    # toyzoo
    p.add_argument("--clips_per_class", type=int, default=100)
    p.add_argument("--difficulty", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=2)
    # web
    p.add_argument("--audioset_csvs", default=None, help="local AudioSet segment CSVs, comma-separated (default: download)")
    p.add_argument("--vggsound_csv", default=None, help="local vggsound.csv (default: download)")
    p.add_argument("--max_per_class", type=int, default=0, help="cap candidates per class (0 = all), for a pilot run")
    p.add_argument("--download_workers", type=int, default=8)
    p.add_argument("--retry_failed", action="store_true", help="retry videos the log marks private/removed")
    # oracles
    p.add_argument("--skip_oracles", default=None,
                   help="comma-separated subset of pann,clip,vad to skip (default: none for web sources, all for folder)")
    p.add_argument("--pann_threshold", type=float, default=PANN_THRESHOLD)
    p.add_argument("--clip_threshold", type=float, default=CLIP_THRESHOLD)
    p.add_argument("--vad_max_voiced", type=float, default=VAD_MAX_VOICED)
    p.add_argument("--pann_checkpoint", default=PANN_CHECKPOINT)
    # clips
    p.add_argument("--min_length_policy", default="pad", choices=("pad", "refuse"),
                   help="clips shorter than one 3.41 s window: pad with silence (true length kept) or refuse")
    p.add_argument("--pseudo_labels", default="auto", choices=("auto", "dav2_dsine", "flat", "none"))
    p.add_argument("--batch_size", type=int, default=16, help="keyframes per pseudo-labeller batch")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    args.sources = [s.strip() for s in args.source.split(",") if s.strip()]
    if args.skip_oracles is None:
        args.skip_oracles = "pann,clip,vad" if args.sources == ["folder"] else ""
    args.skip_oracles = [s.strip() for s in args.skip_oracles.split(",") if s.strip()]
    bad = [s for s in args.skip_oracles if s not in ORACLES]
    if bad:
        p.error(f"--skip_oracles: unknown {bad}; choose from {ORACLES}")
    return args


def main(argv=None, fetch=fetch_ytdlp, oracle_models=None):
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
        args.dataset = args.dataset or safe_id(os.path.splitext(os.path.basename(os.path.normpath(args.path)))[0])
    elif set(src) <= {"audioset", "vggsound"}:
        args.dataset = args.dataset or "animals"
    else:
        raise SystemExit(f"--source={args.source}: choose toyzoo, audioset and/or vggsound, manifest, or folder")
    raw = rawdata.raw_dir(args.dataset, args.data_root)
    os.makedirs(os.path.join(raw, "clips"), exist_ok=True)
    if src == ["folder"]:
        return build_folder(args, raw, oracle_models)
    classes = args.classes.split(",") if args.classes else sorted(CLASS_MAP)
    if src == ["manifest"]:
        cands = [c for c in parse_clip_list(args.path) if c["cls"] in classes]
        removed = {}
    else:
        unknown = [c for c in classes if c not in CLASS_MAP]
        if unknown:
            raise SystemExit(f"--classes: {unknown} not in the class map ({', '.join(sorted(CLASS_MAP))})")
        cands, removed = web_candidates(args, os.path.join(os.path.dirname(raw), "download"), classes, src)
    cands = cap_per_class(cands, args.max_per_class, args.seed)
    return build_web(args, raw, cands, removed, fetch=fetch, oracle_models=oracle_models)


if __name__ == "__main__":
    main()
