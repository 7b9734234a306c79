"""
Any-to-any generation with a trained nano4M: MaskGIT (or 4M's ROAR) decoding of one target modality from
any set of conditioning modalities, decoded to wav / png / text, with an index.html gallery beside the
ground truth.

    python sample.py --mode=class_only                       # audio from the caption alone (the hardest case)
    python sample.py --mode=continuation                     # first 80% of the audio + rgb + caption given
    python sample.py --cond=rgb,caption --target=audio       # the general form
    python sample.py --cond=audio --target=rgb
    python sample.py --cond=rgb --target=depth --per_class=2 --num_samples=1
    python sample.py --cond=audio --target=caption

Generation itself is one importable function, `generate(model, tokens, known, target, ...)`, batched and
device-agnostic; evaluate.py uses it for its generation probes.

How a step works (MaskGIT, Chang et al. 2022; ROAR from 4M, Mizrahi et al. 2023): the encoder sees every
given token plus every target token decoded so far, the decoder queries target positions still masked,
one token is sampled per query from the (temperature / top-k / top-p filtered) logits over the target
modality's own ids, and some of them are committed: MaskGIT keeps the most confident ones so that the
cosine schedule's count stays masked, ROAR keeps a random subset of that size (it only queries those).
A committed token is never re-masked, so every position is decoded exactly once. Audio is committed in
whole frames (both codebook tokens of a frame at once, a frame's confidence the sum of its tokens'), the
unit training masks it in: a half-decoded frame is an input the model never saw.
"""
import html
import math
import os
import sys
import time

import numpy as np
import torch

import modalities as M   # the audio layout's names (M.BY_NAME, M.POS_OFFSETS, M.AUDIO_*) are read at call time
from modalities import MODALITY_NAMES, SHORT_NAMES, CAPTION_PAD, NULL_ID, modality_index, caption_valid, null_position


# ---------------------------------------------------------------------------------------------------
# the generation core

def full_name(name):
    """'audio' -> 'tok_audio'; refuses unknown names with the valid list."""
    return MODALITY_NAMES[modality_index(name)]


def masked_count(n_unknown, step, steps, schedule="cosine"):
    """How many of n_unknown target positions are still masked after step `step` (0-based) of `steps`.
    cosine (MaskGIT): ceil(n * cos(pi/2 * (step+1)/steps)); linear: ceil(n * (1 - (step+1)/steps)).
    Works elementwise on a LongTensor of per-sample counts; the last step always leaves 0 (cos(pi/2) is
    6e-17 in floating point, which ceil would round up to 1)."""
    r = (step + 1) / steps
    frac = math.cos(math.pi / 2 * r) if schedule == "cosine" else 1.0 - r
    if step + 1 >= steps:
        frac = 0.0
    if torch.is_tensor(n_unknown):
        return torch.ceil(n_unknown.double() * frac).long()
    return int(math.ceil(n_unknown * frac))


def pack(mask, *columns):
    """Gather the True entries of mask [B, L] to the front of each row: returns (valid [B, N], order [B, N],
    gathered columns), N = the largest row count (at least 1). Padding slots hold 0 in every column."""
    n = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else 1
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.gather(mask, 1, order)
    return valid, order, [torch.gather(c, 1, order) * valid for c in columns]


def filter_logits(logits, top_k=0, top_p=1.0):
    """Standard top-k then nucleus (top-p) filtering: excluded ids get -inf. logits [n, V] (float32)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop an id once the mass before it already reaches top_p (the most likely id always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def codebook_mask(index, vocab):
    """Audio stream indices [n] -> bool [n, vocab]: the ids each slot may take. Slot K*t + k holds codebook
    k of frame t, whose ids are [k * V, (k + 1) * V) (modalities.interleave_audio); any other id would be
    another codebook's code, which decoding can only clamp."""
    k = (index % M.AUDIO_CODEBOOKS)[:, None]
    ids = torch.arange(vocab, device=index.device)[None]
    return (ids >= k * M.AUDIO_CODEBOOK_SIZE) & (ids < (k + 1) * M.AUDIO_CODEBOOK_SIZE)


def _rand(shape, generator, device):
    """Uniform [0, 1) numbers drawn from `generator` on its own device, then moved: one CPU generator
    reproduces the same samples on any device."""
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


def _gumbel(shape, generator, device):
    u = _rand(shape, generator, device).clamp_(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def generate(model, tokens, known, target, steps=16, schedule="maskgit", temperature=1.0,
             temperature_end=None, top_k=0, top_p=1.0, guidance_scale=1.0, remask_noise=0.0,
             count_schedule="cosine", generator=None, codebook_true=True):
    """Decode the unknown positions of modality `target` given the known tokens of every modality.

    tokens: {modality: LongTensor [B, L_m]}, short or full names; only the modalities used need be present
        (the target may be absent: it is then fully unknown).
    known:  {modality: BoolTensor [B, L_m]}, True = given as conditioning. A modality in `tokens` without an
        entry is fully known if it is not the target and fully unknown if it is. For the target, the known
        positions (e.g. the first 80% for continuation) keep their values in the output. A known caption is
        fed whole, its end-of-text padding included, as training feeds it (modalities.caption_valid).
        A caption target ends at its first end-of-text: once one is decoded (or given), every later position
        is set to end-of-text (the padding training always saw there) and is no longer decoded.
    schedule: "maskgit" (confidence-ranked commits) or "roar" (random order, accept all of a step).
    count_schedule: "cosine" or "linear": how many positions stay masked after each step.
    temperature, temperature_end: sampling temperature, annealed linearly to temperature_end over the steps
        when given. temperature <= 0 means greedy (argmax).
    top_k (0 = off), top_p (1.0 = off): logit filtering before sampling.
    guidance_scale: classifier-free guidance, logits = uncond + scale * (cond - uncond). The unconditional
        pass keeps only the target modality's own known / decoded tokens as input; where that leaves a sample
        with no input at all it gets one "null" token: an empty caption (the end-of-text id) at caption
        position 0 (at the last caption position when the caption is the target, so it never sits on a
        queried position). That is exactly the input train.py's conditioning dropout (--cond_dropout,
        masking.condition_dropout) trains the model on. At 1.0 the unconditional pass is skipped: the
        result is the conditional one.
    codebook_true: an audio target samples each slot from its own codebook's ids only (codebook_mask); False
        draws every slot from all of the modality's ids, as before (decoding then clamps a wrong-codebook id).
    remask_noise: MaskGIT's annealed randomness on the confidences: Gumbel noise scaled by
        remask_noise * (1 - progress) is added to the log-probability of each sampled token before ranking.
    generator: torch.Generator for every random draw (reproducible; may live on the CPU for a GPU model).
    The model is used as it is: put it in eval mode first (model.load_checkpoint does), or dropout samples too.

    Returns LongTensor [B, L_target] of the target modality's ids (in [0, vocab_target)).
    """
    if schedule not in ("maskgit", "roar"):
        raise ValueError(f"schedule must be 'maskgit' or 'roar', got {schedule!r}")
    if count_schedule not in ("cosine", "linear"):
        raise ValueError(f"count_schedule must be 'cosine' or 'linear', got {count_schedule!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    target = full_name(target)
    t_idx = modality_index(target)
    t_mod = M.BY_NAME[target]
    device = next(model.parameters()).device
    tokens = {full_name(k): v.to(device) for k, v in tokens.items()}
    known = {full_name(k): v.to(device) for k, v in known.items()}
    if not tokens:
        raise ValueError("generate needs at least one modality in `tokens` (to know the batch size)")
    B = next(iter(tokens.values())).size(0)

    # the flat layout: every modality present, in the table's order, the target included
    names = [m.name for m in M.MODALITIES if m.name in tokens or m.name == target]
    ids_parts, pos_parts, given_parts = [], [], []
    for name in names:
        L = M.BY_NAME[name].length
        ids = tokens.get(name, torch.zeros(B, L, dtype=torch.long, device=device)).long()
        if ids.shape != (B, L):
            raise ValueError(f"tokens[{name!r}] has shape {tuple(ids.shape)}, expected ({B}, {L})")
        if name in known:
            g = known[name].bool()
            if g.shape != (B, L):
                raise ValueError(f"known[{name!r}] has shape {tuple(g.shape)}, expected ({B}, {L})")
        else:
            g = torch.full((B, L), name != target, dtype=torch.bool, device=device)
        if name == "caption":
            g = g & caption_valid(ids)
        bad = g & ((ids < 0) | (ids >= M.BY_NAME[name].vocab))
        if bad.any():
            raise ValueError(f"tokens[{name!r}] holds ids outside [0, {M.BY_NAME[name].vocab})")
        ids_parts.append(ids)
        pos_parts.append(M.POS_OFFSETS[modality_index(name)] + torch.arange(L, device=device).expand(B, L))
        given_parts.append(g)
    t_slot = names.index(target)
    t_start = sum(M.BY_NAME[n].length for n in names[:t_slot])
    t_len = t_mod.length
    flat_ids = torch.cat(ids_parts, dim=1)
    flat_pos = torch.cat(pos_parts, dim=1)
    flat_given = torch.cat(given_parts, dim=1)
    in_target = torch.zeros_like(flat_given)
    in_target[:, t_start:t_start + t_len] = True

    # the null input of the unconditional pass: the one conditioning dropout trains (modalities.null_position)
    null_id = torch.full((B, 1), NULL_ID, dtype=torch.long, device=device)
    null_pos = torch.full((B, 1), null_position(target == "caption"), dtype=torch.long, device=device)

    out = flat_ids[:, t_start:t_start + t_len].clone()
    out = torch.where(flat_given[:, t_start:t_start + t_len], out, torch.zeros_like(out))
    masked = ~flat_given[:, t_start:t_start + t_len]           # target positions still to decode
    t_pos = flat_pos[:, t_start:t_start + t_len]
    # the commit unit: an audio frame (its K codebook ids, as training masks it) or one token
    group = M.AUDIO_CODEBOOKS if target == "tok_audio" else 1
    units = lambda x: x.view(B, t_len // group, group)
    n_unknown = units(masked).any(-1).sum(dim=1)               # units with something to decode

    def run(ids_now, enc_mask, query, add_null):
        """One pass: encoder on the flat entries where enc_mask, decoder on the target positions where
        query. Returns logits [n, vocab_t] of the valid queries and where they sit (dv, d_order)."""
        ev, _, (e_ids, e_pos) = pack(enc_mask, ids_now, flat_pos)
        if add_null:
            empty = ~enc_mask.any(dim=1, keepdim=True)
            e_ids = torch.cat([e_ids, null_id], dim=1)
            e_pos = torch.cat([e_pos, null_pos], dim=1)
            ev = torch.cat([ev, empty], dim=1)
        dv, d_order, (d_pos,) = pack(query, t_pos)
        h = model.decode_hidden(e_ids, e_pos, ev, d_pos, dv)
        return model.modality_logits(h[dv], t_idx).float(), dv, d_order

    for step in range(steps):
        if not masked.any():
            break
        progress = step / max(steps - 1, 1)
        temp = temperature if temperature_end is None else temperature + (temperature_end - temperature) * progress
        masked_u = units(masked).any(-1)                                        # [B, units]
        keep_masked = masked_count(n_unknown, step, steps, count_schedule)     # [B], in units
        n_commit = masked_u.sum(dim=1) - keep_masked                            # [B], >= 0
        if schedule == "roar":
            # random order: pick this step's units first, then query only them and accept all
            score = torch.where(masked_u, _rand(masked_u.shape, generator, device), -1.0)
            rank = torch.argsort(torch.argsort(score, dim=1, descending=True), dim=1)
            query = masked & (rank < n_commit[:, None]).repeat_interleave(group, dim=1)
        else:
            query = masked
        if not query.any():
            continue
        flat_ids_now = flat_ids.clone()
        flat_ids_now[:, t_start:t_start + t_len] = out
        decoded = in_target.clone()
        decoded[:, t_start:t_start + t_len] = ~masked
        enc_mask = (flat_given & ~in_target) | decoded
        logits, dv, d_order = run(flat_ids_now, enc_mask, query, add_null=False)
        if guidance_scale != 1.0:
            uncond, _, _ = run(flat_ids_now, decoded, query, add_null=True)
            logits = uncond + guidance_scale * (logits - uncond)
        if target == "tok_audio" and codebook_true:   # each slot only from its own codebook's ids
            logits = logits.masked_fill(~codebook_mask(d_order[dv], t_mod.vocab), float("-inf"))

        # sample one id per query (Gumbel-max on the filtered logits = a draw from their softmax)
        if temp <= 0:
            sampled = logits.argmax(dim=-1)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, sampled[:, None])[:, 0]
        else:
            logits = filter_logits(logits / temp, top_k=top_k, top_p=top_p)
            sampled = (logits + _gumbel(logits.shape, generator, device)).argmax(dim=-1)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, sampled[:, None])[:, 0]

        # scatter back to [B, t_len]
        rows = torch.arange(B, device=device)[:, None].expand_as(d_order)[dv]
        cols = d_order[dv]
        cand = torch.zeros_like(out)
        cand[rows, cols] = sampled
        if schedule == "roar":
            commit = query
        else:
            conf = torch.full((B, t_len), float("-inf"), device=device)
            if remask_noise > 0:
                logp = logp + remask_noise * (1.0 - progress) * _gumbel(logp.shape, generator, device)
            conf[rows, cols] = logp
            # a unit's confidence: the summed log-probability of its masked tokens
            conf_u = torch.where(masked_u, units(torch.where(masked, conf, 0.0)).sum(-1), float("-inf"))
            # the n_commit most confident masked units of each row (stable ties: lower index first)
            rank = torch.argsort(torch.argsort(-conf_u, dim=1, stable=True), dim=1)
            commit = masked & (rank < n_commit[:, None]).repeat_interleave(group, dim=1)
        out = torch.where(commit, cand, out)
        masked = masked & ~commit
        if target == "caption":
            # a caption ends at its first end-of-text and training only ever fed end-of-text after it (the
            # loss never scored those positions, so the model's guesses there are noise): once an
            # end-of-text is in, every later position is padding, committed now
            ended = (out == CAPTION_PAD) & ~masked
            after = (ended.long().cumsum(dim=1) - ended.long()) > 0
            out = torch.where(after, torch.full_like(out, CAPTION_PAD), out)
            masked = masked & ~after
    assert not masked.any(), "schedule left positions undecoded"
    return out


def continuation_prefix(frac=0.8):
    """Audio tokens given in continuation mode: the first `frac` of the T frames, rounded to whole frames
    (EnCodec: 0.8 -> 205 of 256 frames = 410 tokens), so a frame's K codebook tokens are never split."""
    return int(round(frac * M.AUDIO_FRAMES)) * M.AUDIO_CODEBOOKS


# ---------------------------------------------------------------------------------------------------
# pictures and sounds for the gallery

# a small perceptual colormap (dark purple -> red -> yellow, roughly "inferno"), as RGB anchors
_CMAP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def colormap(x):
    """x in [0, 1], any shape -> uint8 [..., 3]."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float32)), 0.0, 1.0) * (len(_CMAP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_CMAP) - 2)
    w = (x - lo)[..., None]
    return ((1 - w) * _CMAP[lo] + w * _CMAP[lo + 1]).round().astype(np.uint8)


def spectrogram_image(wave, mark_frame=None, dynamic_range=10.0):
    """Waveform [T] at 24 kHz -> uint8 RGB picture of its log-mel spectrogram (time left to right, low
    frequencies at the bottom), the top `dynamic_range` nats of each clip shown (~43 dB). Uses the audio
    tokenizer's own front-end (modality_tokenizers.log_mel: 75 Hz frames, 80 mel bands). A white line at
    mark_frame shows where a continuation starts."""
    from modality_tokenizers import log_mel
    spec = log_mel(torch.as_tensor(np.asarray(wave, dtype=np.float32))).numpy().T[::-1]   # [80, frames]
    top = spec.max()
    img = colormap((spec - (top - dynamic_range)) / dynamic_range)
    img = np.repeat(img, 2, axis=0)                                                      # 160 px tall
    if mark_frame is not None and 0 < mark_frame < img.shape[1]:
        img[:, mark_frame] = 255
    return np.ascontiguousarray(img)


def depth_picture(depth):
    """uint16 depth [H, W] -> false-colour uint8 [H, W, 3] (near = bright), scaled per image between the
    2nd and 98th percentile of log depth."""
    d = np.log1p(np.asarray(depth, dtype=np.float32))
    lo, hi = np.percentile(d, 2), np.percentile(d, 98)
    return colormap(1.0 - (d - lo) / max(hi - lo, 1e-6))


def _write_text(path, text):
    from rawdata import atomic_path
    tmp = atomic_path(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_npy(path, array):
    from rawdata import atomic_path
    tmp = atomic_path(path) + ".npy"          # np.save appends .npy to names without it
    np.save(tmp, array)
    os.replace(tmp, path)


class Gallery:
    """Writes one modality's decoded output (wav + spectrogram, png, or text) and returns the HTML cell."""

    def __init__(self, root):
        self.root = root

    def media(self, rel, modality, value, mark_frame=None, label=""):
        """value: float wave [T] (audio), uint8/uint16 image (rgb/depth/normal), str (caption)."""
        path = os.path.join(self.root, rel)
        from rawdata import write_png, write_wav
        cap = f"<div class='lbl'>{label}</div>" if label else ""
        if modality == "tok_audio":
            write_wav(path + ".wav", value)
            write_png(path + "_spec.png", spectrogram_image(value, mark_frame))
            return (f"{cap}<audio controls preload='none' src='{rel}.wav'></audio><br>"
                    f"<img class='spec' src='{rel}_spec.png'>")
        if modality == "caption":
            _write_text(path + ".txt", value)
            return f"{cap}<div class='cap'>{html.escape(value)}</div>"
        if modality == "tok_depth":
            write_png(path + ".png", np.asarray(value, dtype=np.uint16))   # the 16-bit map itself
            write_png(path + "_vis.png", depth_picture(value))
            return f"{cap}<img src='{rel}_vis.png'>"
        write_png(path + ".png", np.asarray(value, dtype=np.uint8))
        return f"{cap}<img src='{rel}.png'>"


# ---------------------------------------------------------------------------------------------------
# the command line

DEFAULTS = dict(
    out_dir="out/toyzoo",      # checkpoint dir (default: the quickstart run): reads out_dir/ckpt.pt; its config names dataset / data_root
    mode="",                   # 'class_only' | 'continuation' | '' (then --cond / --target)
    cond="caption",            # comma list of conditioning modalities (rgb, depth, normal, audio, caption);
                               # '' = unconditional
    target="audio",
    split="test",
    num_clips=8,               # clips drawn (seeded) from the split ...
    per_class=0,               # ... or, if > 0, this many clips of every class (overrides num_clips)
    view=0,                    # which of the 10 views (keyframe + its audio window) of each clip
    num_samples=2,             # generations per clip
    batch_size=32,
    steps=16,                  # decoding steps
    schedule="maskgit",        # 'maskgit' (confidence-ranked) or 'roar' (random order, accept all)
    count_schedule="cosine",   # 'cosine' or 'linear': how many positions stay masked after each step
    temperature=1.0,
    temperature_end=None,      # anneal linearly to this over the steps (None = constant)
    top_k=0,                   # 0 = off
    top_p=1.0,                 # 1.0 = off
    guidance_scale=3.0,        # classifier-free guidance; 1.0 = the conditional model alone. 3.0: class-only
                               # audio judged the right class once decoded 34-43% vs 9-14% at 1.0 (README)
    remask_noise=0.0,          # MaskGIT's annealed Gumbel noise on the confidences
    codebook_true=True,        # audio: each slot samples only its own codebook's ids (False: all 2,048 ids)
    continuation_frac=0.8,     # continuation: the fraction of the audio frames given
    seed=1337,
    device="auto",             # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'
    dtype="float32",           # 'float32' or 'bfloat16' (autocast on CUDA)
    samples_dir="",            # default out_dir/samples/<mode or cond-target>/
    dataset="",                # '' = the checkpoint's
    data_root="",              # '' = the checkpoint's
    trust_checkpoint=False,    # True: also load a pickled checkpoint / codebook of your own (older runs); never
                               # someone else's, whose pickle could run code (the default is weights_only=True)
)


def resolve_task(cfg):
    """-> (conditioning modality names, target name, number of given target tokens, run name)."""
    mode = cfg["mode"]
    if mode == "class_only":
        return ["caption"], "tok_audio", 0, "class_only"
    if mode == "continuation":
        if not 0.0 < cfg["continuation_frac"] < 1.0:
            raise ValueError(f"--continuation_frac must lie in (0, 1), got {cfg['continuation_frac']}")
        return ["tok_rgb", "caption"], "tok_audio", continuation_prefix(cfg["continuation_frac"]), "continuation"
    if mode:
        raise ValueError(f"--mode must be 'class_only', 'continuation' or '' (then --cond/--target), got {mode!r}")
    target = full_name(cfg["target"])
    cond = [full_name(c.strip()) for c in cfg["cond"].split(",") if c.strip()]
    if target in cond:
        raise ValueError(f"--target={cfg['target']} is also in --cond={cfg['cond']}")
    if len(set(cond)) != len(cond):
        raise ValueError(f"--cond={cfg['cond']} names a modality twice")
    short = {v: k for k, v in SHORT_NAMES.items()}
    name = ("+".join(short[c] for c in cond) or "nothing") + "-to-" + short[target]
    return cond, target, 0, name


def choose_clips(labels, num_classes, num_clips, per_class, seed):
    """Row indices into the split: a seeded shuffle, then either the first num_clips or the first
    per_class of every class. Returned sorted (sequential memmap reads)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if per_class > 0:
        picked = []
        for c in range(num_classes):
            picked += [int(i) for i in order if labels[i] == c][:per_class]
        return np.array(sorted(picked), dtype=np.int64)
    return np.sort(order[:num_clips])


def main(argv=None):
    import configurator
    from tqdm import tqdm
    from model import load_checkpoint
    from modality_tokenizers import load_tokenizer, pick_device
    from rawdata import raw_dir, read_manifest, read_png

    cfg = configurator.apply_overrides(DEFAULTS, sys.argv[1:] if argv is None else argv)
    cond, target, n_prefix, run_name = resolve_task(cfg)
    device = pick_device(cfg["device"])
    if cfg["num_samples"] < 1 or cfg["batch_size"] < 1 or cfg["steps"] < 1:
        raise ValueError("--num_samples, --batch_size and --steps must be >= 1")
    if not 0 <= cfg["view"] < M.NUM_VIEWS:
        raise ValueError(f"--view must lie in [0, {M.NUM_VIEWS}), got {cfg['view']}")

    model, ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), device, cfg["trust_checkpoint"])
    train_cfg = ckpt.get("config", {})
    dataset = cfg["dataset"] or train_cfg.get("dataset")
    data_root = cfg["data_root"] or train_cfg.get("data_root", "data")
    if not dataset:
        raise ValueError(f"{cfg['out_dir']}/ckpt.pt records no dataset: pass --dataset=NAME")
    tok_path = M.tok_dir(dataset, data_root)
    meta = M.load_meta(tok_path)
    arrays = M.open_split(tok_path, cfg["split"], meta)
    class_names = meta["class_names"]
    labels_all = np.asarray(arrays["label"])
    clips = choose_clips(labels_all, len(class_names), cfg["num_clips"], cfg["per_class"], cfg["seed"])
    if len(clips) == 0:
        raise ValueError(f"{tok_path}/{cfg['split']}: no clips chosen (num_clips / per_class)")
    tokens, labels = M.gather_views(arrays, clips, np.full(len(clips), cfg["view"]))
    clip_ids = [arrays["clip_ids"][i] for i in clips]

    samples_dir = cfg["samples_dir"] or os.path.join(cfg["out_dir"], "samples", run_name)
    os.makedirs(samples_dir, exist_ok=True)
    index_path = os.path.join(samples_dir, "index.html")
    if os.path.exists(index_path):
        os.remove(index_path)   # a run that dies half-way leaves no gallery pointing at mixed files

    # --- generate: every clip num_samples times, in batches, from one seeded generator
    S, N = cfg["num_samples"], len(clips)
    rows = np.repeat(np.arange(N), S)
    L = M.BY_NAME[target].length
    generated = torch.zeros(N * S, L, dtype=torch.long)
    g = torch.Generator().manual_seed(cfg["seed"])
    use_autocast = cfg["dtype"] != "float32" and device.startswith("cuda")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    print(f"{run_name}: {N} clips x {S} samples of {target} from [{', '.join(cond) or 'nothing'}], "
          f"{cfg['schedule']} {cfg['steps']} steps, model {model.get_num_params() / 1e6:.1f}M params on {device}")
    t0 = time.time()
    for start in tqdm(range(0, N * S, cfg["batch_size"]), desc="generating", unit="batch"):
        r = rows[start:start + cfg["batch_size"]]
        batch = {c: tokens[c][r] for c in cond + [target]}
        known = torch.zeros(len(r), L, dtype=torch.bool)
        known[:, :n_prefix] = True
        with torch.autocast(device_type="cuda", dtype=ptdtype, enabled=use_autocast):
            out = generate(model, batch, {target: known}, target, steps=cfg["steps"], schedule=cfg["schedule"],
                           count_schedule=cfg["count_schedule"], temperature=cfg["temperature"],
                           temperature_end=cfg["temperature_end"], top_k=cfg["top_k"], top_p=cfg["top_p"],
                           guidance_scale=cfg["guidance_scale"], remask_noise=cfg["remask_noise"], generator=g,
                           codebook_true=cfg["codebook_true"])
        generated[start:start + len(r)] = out.cpu()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    print(f"generated {N * S} samples in {dt:.2f}s: {N * S / dt:.2f} samples/s "
          f"({N * S * (L - n_prefix) / dt:.0f} tokens/s) on {device}")

    # --- decode and write: generated, tokenized ground truth, raw ground truth, conditioning
    tok = load_tokenizer(tok_path, meta, target, device, cfg["trust_checkpoint"])
    cond_toks = {c: load_tokenizer(tok_path, meta, c, device, cfg["trust_checkpoint"]) for c in cond
                 if c not in ("caption",)}
    manifest = {}
    rdir = raw_dir(dataset, data_root)
    if os.path.exists(os.path.join(rdir, "manifest.jsonl")):
        manifest = {row["clip_id"]: row for row in read_manifest(os.path.join(rdir, "manifest.jsonl"))}
    else:
        print(f"note: {rdir}/manifest.jsonl not found: the gallery shows the tokenized ground truth only")

    def decode(tk, modality, ids):
        if modality == "caption":
            return [M.decode_caption(row) for row in ids.numpy()]
        return list(tk.decode(ids.to(device) if torch.is_tensor(ids) else ids))

    def raw_truth(row, modality):
        """The raw file of this view, or None."""
        v = cfg["view"]
        try:
            if modality == "tok_audio":   # the very window tokenize_all.py tokenized (resampled if needed)
                from tokenize_all import load_audio, audio_windows
                return audio_windows(load_audio(row, rdir), row["keyframe_times"])[v]
            if modality == "caption":
                return row.get("caption")
            key = {"tok_rgb": "frames", "tok_depth": "depths", "tok_normal": "normals"}[modality]
            return read_png(os.path.join(rdir, row[key][v])) if row.get(key) else None
        except (FileNotFoundError, ValueError, KeyError, IndexError, TypeError) as e:
            print(f"note: raw ground truth of {row['clip_id']} unavailable ({e})")
            return None

    gallery = Gallery(samples_dir)
    mark = n_prefix // M.AUDIO_CODEBOOKS if n_prefix else None
    table_rows = []
    t1 = time.time()
    for i in tqdm(range(N), desc="decoding", unit="clip"):
        cid = clip_ids[i]
        sub = f"{i:03d}_{''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in str(cid))}"
        os.makedirs(os.path.join(samples_dir, sub), exist_ok=True)
        ids = generated[i * S:(i + 1) * S]
        _write_npy(os.path.join(samples_dir, sub, "generated_ids.npy"), ids.numpy().astype(np.int64))
        row = manifest.get(cid)
        # conditioning
        cells = []
        for c in cond:
            if c == "caption":
                cells.append(gallery.media(f"{sub}/cond_caption", c, M.decode_caption(tokens[c][i].numpy())))
                continue
            raw = raw_truth(row, c) if row else None
            value = raw if raw is not None else decode(cond_toks[c], c, tokens[c][i:i + 1])[0]
            cells.append(gallery.media(f"{sub}/cond_{c}", c, value, label="raw" if raw is not None else "tokens"))
        if n_prefix:
            cells.append(f"<div class='lbl'>+ first {n_prefix} of {L} audio tokens</div>")
        # generated samples
        gen_cells = [gallery.media(f"{sub}/gen_{j}", target, v, mark, label=f"sample {j}")
                     for j, v in enumerate(decode(tok, target, ids))]
        # ground truth: the tokenized one decoded with the same tokenizer, and the raw file
        gt_cells = [gallery.media(f"{sub}/gt_tokens", target, decode(tok, target, tokens[target][i:i + 1])[0],
                                  mark, label="tokenized")]
        raw = raw_truth(row, target) if row else None
        if raw is not None:
            gt_cells.append(gallery.media(f"{sub}/gt_raw", target, raw, mark, label="raw"))
        table_rows.append(f"<tr><td>{i}<br><b>{html.escape(class_names[int(labels[i])])}</b><br>"
                          f"<small>{html.escape(cid)}<br>view {cfg['view']}</small></td>"
                          f"<td>{'<br>'.join(cells) or '(nothing)'}</td>"
                          f"<td>{'<hr>'.join(gen_cells)}</td><td>{'<hr>'.join(gt_cells)}</td></tr>")
    print(f"decoded and wrote {N * (S + 1)} outputs in {time.time() - t1:.1f}s")

    # run-level records, then the gallery last
    _write_npy(os.path.join(samples_dir, "generated_ids.npy"), generated.view(N, S, L).numpy().astype(np.int64))
    import json
    info = dict(settings=cfg, task=dict(cond=cond, target=target, given_target_tokens=n_prefix, name=run_name),
                checkpoint=os.path.join(cfg["out_dir"], "ckpt.pt"), iter_num=ckpt.get("iter_num"),
                dataset=dataset, split=cfg["split"], clip_ids=clip_ids, rows=clips.tolist(),
                labels=[int(x) for x in labels], classes=[class_names[int(x)] for x in labels],
                samples_per_s=N * S / dt, device=device)
    _write_text(os.path.join(samples_dir, "samples.json"), json.dumps(info, indent=1))
    settings = ", ".join(f"{k}={cfg[k]}" for k in ("steps", "schedule", "count_schedule", "temperature",
                                                     "temperature_end", "top_k", "top_p", "guidance_scale",
                                                     "remask_noise", "seed"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>nano4M samples: {run_name}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}} img{{max-width:224px}} img.spec{{max-width:256px}}
.lbl{{font-size:80%;color:#555}} .cap{{font-family:monospace}}</style></head><body>
<h2>{run_name}: {html.escape(target)} from {html.escape(', '.join(cond) or 'nothing')}</h2>
<p>checkpoint {html.escape(info['checkpoint'])} (iter {info['iter_num']}), dataset {html.escape(dataset)},
split {cfg['split']}, {N} clips x {S} samples, {settings}.<br>{N * S / dt:.2f} samples/s on {device}.
Spectrograms: log-mel, 75 Hz frames, top 10 nats of each clip{'; the white line marks where generation starts' if mark else ''}.</p>
<table><tr><th>clip</th><th>conditioning</th><th>generated</th><th>ground truth</th></tr>
{chr(10).join(table_rows)}
</table></body></html>
"""
    _write_text(index_path, page)
    print(f"wrote {index_path}")
    return info


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"sample.py: {e}")
