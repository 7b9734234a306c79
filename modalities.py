"""
The five-modality table and the tokenized arrays on disk (docs/interfaces.md): uint16 memmaps
tok/<split>/<modality>.bin ([N, 10, L] per view, [N, L] for the caption), label.bin and clip_ids.json,
described by tok/meta.json. Ids of every modality start at 0 in one 50,304-id space; the modality embedding
tells them apart. A token's *global position* (its modality's offset plus its index in the stream) gives
its modality and its row/col, frame/codebook or index, so a batch needs only (ids, positions).

The audio layout (K codebooks of V codes over T frames) is the tokenizer's, recorded in meta.json, and is
module state set by load_meta: read MODALITIES, POS_OFFSETS and AUDIO_* as `modalities.NAME`, never copy them.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

VOCAB_SIZE = 50304          # GPT-2's 50,257 padded up to a multiple of 64
NUM_VIEWS = 10              # keyframes (and audio windows) per clip
GRID = 14                   # 224 px / 16 px patches
AUDIO_SR = 24000
AUDIO_WINDOW = 81920        # samples in one 3.41 s window
CAPTION_LEN = 16            # caption ids, padded with CAPTION_PAD after an end-of-text id
CAPTION_PAD = 50256         # GPT-2 <|endoftext|>: ends a caption and pads it


def pick_device(device="auto"):
    """'auto' -> 'cuda' when a GPU is there, else 'cpu'; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass(frozen=True)
class Modality:
    name: str       # file stem in tok/<split>/ and key in meta.json
    length: int     # tokens per view (per clip for the caption)
    vocab: int      # ids lie in [0, vocab)
    layout: str     # 'grid' (14x14), 'audio' (T frames x K codebooks, interleaved), 'seq' (1-D)
    per_view: bool  # stored as [N, 10, L] (True) or [N, L] (False)


@dataclass(frozen=True)
class AudioLayout:
    """Where the audio tokenizer's codes c[k, t] (K codebooks of V codes, T frames per window) lie in the
    stream: seq[K*t + k] = c[k, t] + k * V. A frame (its K ids) is the unit of masking and sampling. K is
    chosen per tokenizer so that K * T stays near 512 ids (the report's model and budgets stay comparable)."""
    codebooks: int = 2          # K
    codebook_size: int = 1024   # V: codebook k owns the ids [k * V, (k + 1) * V)
    frames: int = 256           # T: frames in one AUDIO_WINDOW
    frame_rate: float = 75.0    # frames per second
    sample_rate: int = 24000    # the tokenizer's own audio rate (windows are always cut at AUDIO_SR)

    @property
    def length(self):
        return self.codebooks * self.frames

    @property
    def vocab(self):
        return self.codebooks * self.codebook_size


ENCODEC_LAYOUT = AudioLayout()  # the report's: EnCodec 24 kHz at 1.5 kbps, 256 frames x 2 codebooks x 1024


def set_audio_layout(layout=ENCODEC_LAYOUT):
    """Make `layout` the audio layout of this process: rebuilds the modality table and global positions."""
    global AUDIO_LAYOUT, AUDIO_FRAMES, AUDIO_CODEBOOKS, AUDIO_CODEBOOK_SIZE
    global MODALITIES, BY_NAME, POS_OFFSETS, TOTAL_POSITIONS
    if layout.vocab > VOCAB_SIZE or min(layout.codebooks, layout.codebook_size, layout.frames) < 1:
        raise ValueError(f"audio layout {layout}: needs K, V, T >= 1 and K * V <= {VOCAB_SIZE}")
    AUDIO_LAYOUT = layout
    AUDIO_FRAMES, AUDIO_CODEBOOKS, AUDIO_CODEBOOK_SIZE = layout.frames, layout.codebooks, layout.codebook_size
    MODALITIES = (
        Modality("tok_rgb", GRID * GRID, 16384, "grid", True),
        Modality("tok_depth", GRID * GRID, 8192, "grid", True),
        Modality("tok_normal", GRID * GRID, 8192, "grid", True),
        Modality("tok_audio", layout.length, layout.vocab, "audio", True),
        Modality("caption", CAPTION_LEN, VOCAB_SIZE, "seq", False),
    )
    BY_NAME = {m.name: m for m in MODALITIES}
    # global positions: modality i owns [POS_OFFSETS[i], POS_OFFSETS[i] + length)
    POS_OFFSETS = tuple(int(x) for x in np.cumsum([0] + [m.length for m in MODALITIES])[:-1])
    TOTAL_POSITIONS = sum(m.length for m in MODALITIES)


def layout_from_meta(meta):
    """The audio layout a tokenized dataset records (meta.json's tok_audio "layout"); EnCodec's when it
    records none (datasets tokenized before the layout was recorded are all EnCodec-shaped)."""
    info = meta.get("modalities", {}).get("tok_audio", {}).get("layout")
    return ENCODEC_LAYOUT if info is None else AudioLayout(**info)


set_audio_layout(ENCODEC_LAYOUT)
MODALITY_NAMES = tuple(m.name for m in MODALITIES)
SHORT_NAMES = {"rgb": "tok_rgb", "depth": "tok_depth", "normal": "tok_normal", "audio": "tok_audio",
               "caption": "caption"}  # what a researcher types on the command line


def modality_index(name):
    """'audio' or 'tok_audio' -> 3."""
    name = SHORT_NAMES.get(name, name)
    if name not in BY_NAME:
        raise ValueError(f"unknown modality {name!r}; valid: {', '.join(SHORT_NAMES)}")
    return MODALITY_NAMES.index(name)


def position_modality(pos):
    """Global positions (tensor) -> modality index of each."""
    offsets = torch.tensor(POS_OFFSETS[1:], device=pos.device)
    return torch.bucketize(pos, offsets, right=True)


# ---------------------------------------------------------------------------------------------------
# the caption's masks (its BPE codec: streams.py)

def caption_valid(caption):
    """[..., CAPTION_LEN] ids -> bool mask of the caption tokens that take part: all of them, padding included,
    so the number of caption queries never gives away the caption's length (and with it the class)."""
    if torch.is_tensor(caption):
        return torch.ones_like(caption, dtype=torch.bool)
    return np.ones(np.shape(caption), dtype=bool)


IGNORE_ID = -1              # a decoder target that is queried but not scored (see caption_scored)


def caption_scored(caption):
    """[..., CAPTION_LEN] ids -> bool mask of the positions the loss scores: the text and its first end-of-text
    (the padding after it follows from it; scoring it would dilute the class word). The rest stay queries."""
    pad = caption == CAPTION_PAD
    return (pad.cumsum(-1) if torch.is_tensor(pad) else np.cumsum(pad, -1)) <= 1


def caption_targets(caption):
    """[..., CAPTION_LEN] ids -> the same ids as decoder targets: IGNORE_ID where caption_scored is False."""
    where = torch.where if torch.is_tensor(caption) else np.where
    return where(caption_scored(caption), caption, IGNORE_ID)


# ---------------------------------------------------------------------------------------------------
# the unconditional ("null") input of conditioning dropout (training) and guidance (sampling)

NULL_ID = CAPTION_PAD       # an empty caption: end-of-text alone


def null_position(caption_targeted):
    """Global position of the null token: caption index 0, or its last index when the caption is predicted."""
    start = POS_OFFSETS[MODALITY_NAMES.index("caption")]
    if torch.is_tensor(caption_targeted):
        return start + caption_targeted.long() * (CAPTION_LEN - 1)
    return start + (CAPTION_LEN - 1 if caption_targeted else 0)


# ---------------------------------------------------------------------------------------------------
# the tokenized dataset on disk

def tok_dir(dataset, data_root="data"):
    return os.path.join(data_root, dataset, "tok")


def load_meta(tok_path):
    """meta.json of a tokenized dataset; also makes its audio layout this process's (set_audio_layout)."""
    path = os.path.join(tok_path, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run tokenize_all.py for this dataset first")
    with open(path) as f:
        meta = json.load(f)
    try:
        set_audio_layout(layout_from_meta(meta))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad tok_audio layout: {e}") from None
    return meta


def open_tokenized(dataset, data_root="data", splits=None, also=()):
    """(tok_path, meta, {split: memmaps}): the named splits (or all), plus those of `also` that exist."""
    tok_path = tok_dir(dataset, data_root)
    meta = load_meta(tok_path)
    names = list(meta["splits"]) if splits is None else list(splits)
    names += [s for s in also if s in meta["splits"] and s not in names]
    return tok_path, meta, {s: open_split(tok_path, s, meta) for s in names}


class EmptySplitError(ValueError):
    pass


def open_split(tok_path, split, meta=None):
    """Memory-map one split: {modality name: uint16 memmap, 'label': [N]} plus 'clip_ids' (list)."""
    meta = meta or load_meta(tok_path)
    if split not in meta["splits"]:
        raise ValueError(f"split {split!r} not in {tok_path}/meta.json (has {list(meta['splits'])})")
    n = meta["splits"][split]
    if n == 0:  # np.memmap cannot map an empty file: say which split and what to do instead
        raise EmptySplitError(f"{tok_path}: the {split} split is empty (0 clips; splits: {meta['splits']}): the dataset "
                              f"has too few clips; add clips (prepare_data.py gives val and test a clip each from 3 "
                              f"videos on), rerun prepare_data.py and tokenize_all.py")
    arrays = {}
    for m in MODALITIES:
        shape = (n, NUM_VIEWS, m.length) if m.per_view else (n, m.length)
        path = os.path.join(tok_path, split, m.name + ".bin")
        expected = int(np.prod(shape)) * 2
        if not os.path.exists(path) or os.path.getsize(path) != expected:
            raise ValueError(f"{path}: expected {expected} bytes for uint16 {shape}, "
                             f"found {os.path.getsize(path) if os.path.exists(path) else 'no file'}")
        arrays[m.name] = np.memmap(path, dtype=np.uint16, mode="r", shape=shape)
    arrays["label"] = np.memmap(os.path.join(tok_path, split, "label.bin"), dtype=np.uint16, mode="r",
                                shape=(n,))
    with open(os.path.join(tok_path, split, "clip_ids.json")) as f:
        arrays["clip_ids"] = json.load(f)
    return arrays


def shift_grids(tokens, max_shift, generator=None):
    """Shift each sample's image grids by one random whole-patch offset (|dy|, |dx| <= max_shift, the same for
    rgb, depth and normal; borders repeat): exact in id space, a patch keeps its id. Returns a new dict."""
    B = tokens[MODALITIES[0].name].shape[0]
    d = torch.randint(-max_shift, max_shift + 1, (B, 2), generator=generator)
    r = torch.arange(GRID)
    rows = (r[None, :] - d[:, :1]).clamp(0, GRID - 1)            # [B, 14]: the source row of each row
    cols = (r[None, :] - d[:, 1:]).clamp(0, GRID - 1)
    src = (rows[:, :, None] * GRID + cols[:, None, :]).reshape(B, GRID * GRID)
    out = dict(tokens)
    for m in MODALITIES:
        if m.layout == "grid":
            out[m.name] = tokens[m.name].gather(1, src.to(tokens[m.name].device))
    return out


def gather_views(arrays, clips, views):
    """Read the given (clip, view) pairs: returns {modality name: LongTensor [B, L]} and labels [B]."""
    clips = np.asarray(clips)
    views = np.asarray(views)
    out = {}
    for m in MODALITIES:
        a = arrays[m.name]
        rows = a[clips, views] if m.per_view else a[clips]
        out[m.name] = torch.from_numpy(rows.astype(np.int64))
    labels = torch.from_numpy(np.asarray(arrays["label"][clips]).astype(np.int64))
    return out, labels
