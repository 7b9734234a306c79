"""
The raw clip layout shared by every source of prepare_data.py and read by tokenize_all.py.

    data/<dataset>/raw/manifest.jsonl      one JSON object per clip (see ROW_FIELDS)
    data/<dataset>/raw/clips/<clip_id>/
        audio.wav                          24 kHz mono, 16-bit PCM, the whole clip (~10 s)
        frame_00.png .. frame_09.png       RGB keyframes, 224x224
        depth_00.png .. depth_09.png       16-bit grayscale depth, larger = farther (optional)
        normal_00.png .. normal_09.png     RGB surface normals, channel = (n + 1) / 2 * 255 (optional)

Every file is written through files.py (a temporary name, then an atomic rename), so an interrupted run never
leaves a half-written file under its final name.
"""
import heapq
import json
import os
import re
import wave

import numpy as np

# the writers the raw layout's scripts call as rawdata.write_* (prepare_data.py, toyzoo.py, tokenize_all.py)
from files import atomic_path, atomic_write, write_json, write_npy, write_png, write_text, write_wav  # noqa: F401
from modalities import AUDIO_SR, AUDIO_WINDOW

RAW_SR = 24000
RAW_VIEWS = 10
FRAME_SIZE = 224

# what every manifest row holds (sources may add more keys, e.g. oracle scores)
ROW_FIELDS = (
    "clip_id",        # unique, filesystem-safe
    "class",          # class name; its index is its position in the sorted class list of the dataset
    "source",         # toyzoo | audioset | vggsound | audioset+vggsound | folder | manifest
    "split",          # train | val | test
    "caption",        # "a photo of a {class}"
    "audio",          # path relative to raw/
    "frames",         # 10 paths relative to raw/
    "depths",         # 10 paths or null
    "normals",        # 10 paths or null
    "keyframe_times", # 10 times in seconds (each view's audio window is centred there)
    "duration_s",     # true length of the audio
    "oracles",        # {name: score or "skipped"}
    "origin",         # where it came from: {youtube_id, start_s, ...} / {path} / {seed}
)
SPLITS = ("train", "val", "test")


# a name that becomes one path component: no separator, never "." / ".." or hidden (leading dot)
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


def check_name(name, what="name"):
    """Refuse a user-given name that would not stay one plain folder under its parent (e.g. '../x')."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a safe file name: use 1-200 of A-Z a-z 0-9 _ . - "
                         f"(not starting with a dot)")
    return name


def raw_dir(dataset, data_root="data"):
    return os.path.join(data_root, check_name(dataset, "dataset"), "raw")


def clip_dir(raw, clip_id):
    """raw/clips/<clip_id>, with clip_id checked so the path cannot leave raw/clips/."""
    return os.path.join(raw, "clips", check_name(clip_id, "clip id"))


def read_wav(path):
    """16-bit PCM wav -> (float32 mono [T] in [-1, 1], sample rate). Multi-channel is averaged."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: audio file missing")
    try:
        with wave.open(path, "rb") as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            data = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a readable PCM wav ({e})") from None
    if width != 2:
        raise ValueError(f"{path}: expected 16-bit PCM, got {8 * width}-bit")
    x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, ch).mean(axis=1), sr


MIN_SR, MAX_SR = 4000, 384000   # rates we resample from; anything outside is a broken file


def check_rate_and_length(cid, path, sr, n):
    if not (MIN_SR <= sr <= MAX_SR):
        raise ValueError(f"clip {cid}: {path} has sample rate {sr} Hz, which cannot be resampled to "
                         f"{AUDIO_SR} Hz (accepted: {MIN_SR}..{MAX_SR} Hz)")
    if n * AUDIO_SR / sr < AUDIO_WINDOW:
        raise ValueError(f"clip {cid}: {path} is {n / sr:.2f} s, shorter than the "
                         f"{AUDIO_WINDOW / AUDIO_SR:.2f} s window (prepare_data.py pads short clips, so "
                         f"this file is damaged or was not made by it)")


def load_audio(row, raw):
    """A manifest row's audio at 24 kHz as float32 [T]; resampled from another sane rate, else refused."""
    cid = row["clip_id"]
    path = os.path.join(raw, row["audio"])
    try:
        x, sr = read_wav(path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"clip {cid}: {e}") from None
    check_rate_and_length(cid, path, sr, len(x))
    if sr != AUDIO_SR:
        import torch
        import torchaudio.functional as AF
        x = AF.resample(torch.from_numpy(x), sr, AUDIO_SR).numpy()
    if len(x) < AUDIO_WINDOW:  # resampling rounded a borderline length down
        x = np.pad(x, (0, AUDIO_WINDOW - len(x)))
    return x


def audio_windows(x, times):
    """[T] audio + 10 keyframe times -> [10, 81920] windows centred on the times, clamped to the clip: the
    audio of each view, as tokenize_all.py tokenizes it."""
    half = AUDIO_WINDOW // 2
    starts = [min(max(int(round(t * AUDIO_SR)) - half, 0), len(x) - AUDIO_WINDOW) for t in times]
    return np.stack([x[s:s + AUDIO_WINDOW] for s in starts])


def read_png(path, size=FRAME_SIZE):
    """png -> numpy array (uint8 [H, W, 3] for RGB/normals, uint16 [H, W] for 16-bit depth).
    Refuses an image that is not size x size."""
    from PIL import Image
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: image file missing")
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if img.size != (size, size):
        raise ValueError(f"{path}: expected {size}x{size}, got {img.size[0]}x{img.size[1]}")
    if img.mode in ("I;16", "I;16B", "I"):
        return np.asarray(img, dtype=np.uint16) if img.mode != "I" else np.asarray(img).astype(np.uint16)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------
# manifest

def write_manifest(path, rows):
    """Write all rows as JSON lines, atomically."""
    write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_manifest(path):
    """manifest.jsonl -> list of rows; a malformed line or missing field is an error naming the line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run prepare_data.py for this dataset first")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
            missing = [k for k in ("clip_id", "class", "split", "audio", "frames") if k not in row]
            if missing:
                raise ValueError(f"{path}:{i}: manifest row lacks {missing}")
            if row["split"] not in SPLITS:
                raise ValueError(f"{path}:{i}: split {row['split']!r} is not one of {SPLITS}")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# split

def stratified_split(strata, seed=1337, fractions=(0.8, 0.1, 0.1), groups=None):
    """Deterministic clip-level split, stratified: within each stratum (e.g. class x source) the items
    are shuffled by `seed` and cut 80/10/10 (rounding the val and test counts, train gets the rest).
    `groups` (e.g. video ids) keeps every item of a group in one split: a group is placed where its
    first item lands. A small dataset whose strata are all too small for a val or test item (9 classes of
    1-4 clips) would leave that split empty: it is then topped up from train to its share of all groups
    (at least one), taken from the strata with the most train groups, so any dataset of 3 or more groups
    has a clip in every split. Returns a list of split names aligned with `strata`."""
    rng = np.random.default_rng(seed)
    n = len(strata)
    by_stratum = {}
    for i, s in enumerate(strata):
        by_stratum.setdefault(s, []).append(i)
    groups = list(range(n)) if groups is None else list(groups)
    out = [None] * n
    group_split = {}
    group_stratum = {}
    for s in sorted(by_stratum, key=str):
        idx = by_stratum[s]
        # one unit per group inside the stratum, so a group is never cut in two
        units = sorted({groups[i] for i in idx}, key=str)
        units = [units[j] for j in rng.permutation(len(units))]
        units = [u for u in units if u not in group_split]
        k = len(units)
        n_val = int(round(k * fractions[1]))
        n_test = int(round(k * fractions[2]))
        n_train = k - n_val - n_test
        for j, u in enumerate(units):
            group_split[u] = "train" if j < n_train else "val" if j < n_train + n_val else "test"
            group_stratum[u] = s
    n_groups = len(group_split)
    for split, frac in (("val", fractions[1]), ("test", fractions[2])):
        if n_groups < len(SPLITS) or frac <= 0 or split in group_split.values():
            continue
        train = {}
        for u, sp in group_split.items():  # in the seeded order: the last train group of a stratum moves
            if sp == "train":
                train.setdefault(group_stratum[u], []).append(u)
        heap = [(-len(us), str(s), s) for s, us in train.items()]
        heapq.heapify(heap)
        for _ in range(min(max(1, int(round(n_groups * frac))), sum(map(len, train.values())) - 1)):
            neg, key, s = heapq.heappop(heap)  # the stratum with the most train groups gives one
            group_split[train[s].pop()] = split
            if train[s]:
                heapq.heappush(heap, (neg + 1, key, s))
    for i in range(n):
        out[i] = group_split[groups[i]]
    return out


def stratified_order(strata, seed):
    """A seeded order of the rows whose every prefix is stratified: the first K rows hold each stratum
    (e.g. class x source) in proportion to its size, less than one row off, whatever K. Within a stratum
    the rows are shuffled by the seed; then each next row comes from the stratum furthest below its share
    k * n_s / N (ties: a seeded stratum order). So the rows of K lie inside the rows of 2K (a data-scale scan
    is nested), and the same seed gives the same order. strata: one hashable per row. -> int64 [N]."""
    rng = np.random.default_rng(seed)
    by = {}
    for i, s in enumerate(strata):
        by.setdefault(s, []).append(i)
    keys = sorted(by, key=str)
    rows = [np.array(by[s])[rng.permutation(len(by[s]))] for s in keys]
    share = np.array([len(r) for r in rows], dtype=np.float64) / len(strata)
    tie = rng.permutation(len(keys)) * 1e-9                   # a seeded order among equal deficits
    taken = np.zeros(len(keys), dtype=np.int64)
    sizes = np.array([len(r) for r in rows])
    order = np.empty(len(strata), dtype=np.int64)
    for k in range(len(strata)):
        deficit = np.where(taken < sizes, (k + 1) * share - taken - tie, -np.inf)
        s = int(np.argmax(deficit))
        order[k] = rows[s][taken[s]]
        taken[s] += 1
    return order


def train_subset(dataset, data_root, train_split, k, seed, report_to=None):
    """The train rows of a K-clip subset run (train.py --max_train_clips): the first K of a seeded
    stratified_order over class x source, so a data-scale scan is nested. The source comes from the raw
    manifest; a tokenized set without one is stratified by class alone (with a printed note).
    report_to: a run's out_dir: print the subset's make-up and write its clip ids to train_clips.json there.
    -> sorted int64 rows."""
    n = len(train_split['label'])
    if k > n:
        raise ValueError(f"max_train_clips={k} but the train split has only {n} train clips")
    manifest = os.path.join(raw_dir(dataset, data_root), 'manifest.jsonl')
    source, note = {}, None
    if os.path.exists(manifest):
        source = {r['clip_id']: r.get('source', '') for r in read_manifest(manifest)}
    else:
        note = f"{manifest} not found: the train subset is stratified by class alone"
    strata = [(int(c), source.get(cid, '')) for c, cid in zip(train_split['label'], train_split['clip_ids'])]
    rows = np.sort(stratified_order(strata, seed)[:k])
    if report_to is not None:
        if note:
            print(f"note: {note}")
        write_json(os.path.join(report_to, 'train_clips.json'), [train_split['clip_ids'][i] for i in rows])
        labels = np.asarray(train_split['label'])
        per = np.bincount(labels[rows], minlength=int(labels.max()) + 1).tolist()
        print(f"train subset: {k} of {n} clips, per class {per} (ids in {report_to}/train_clips.json)")
    return rows
