"""
4M-style input/target masking for nano4M-Audio, with stride-2 contiguous spans on the audio stream.

build_batch(tokens, cfg, generator) turns one view per sample ({modality: LongTensor [B, L_m]}) into
the padded encoder/decoder batch of docs/interfaces.md. Per sample it:

  1. picks a mixture component (cfg.mixture; one component when it is None),
  2. draws an input budget uniformly from input_budget, splits it over the modalities with proportions
     drawn from Dirichlet(input_alphas), clamps each share to what the modality has, and hands what
     clamping freed to the modalities that still have room (a zero alpha always gets nothing),
  3. does the same for the targets, over the tokens NOT chosen as inputs (inputs and targets disjoint),
  4. picks the tokens: uniformly random positions for rgb/depth/normal and for the caption, a few
     contiguous frame spans for audio (a frame = the codebook pair (2t, 2t+1), never split),
  5. packs the chosen tokens (modality order, then position order) into fixed-size padded tensors.

Everything is vectorized over the batch and free of host syncs (no .item(), no boolean indexing), so it
runs on the inputs' device (CPU or CUDA) without stalling the GPU queue.

MaskingConfig fields (train.py builds it from its module-level variables of the same names):

  input_budget      (lo, hi) inclusive; per sample the total number of input tokens is drawn uniformly
                    from it (before clamping to what exists; modalities in input_full come on top).
  target_budget     (lo, hi) inclusive; the same for target tokens.
  input_alphas      5 Dirichlet concentrations, order modalities.MODALITIES (rgb, depth, normal, audio,
                    caption). 1.0 everywhere = 4M's uniform mixing; small values (e.g. 0.2) make samples
                    concentrate on one or two modalities; 0 means that modality is never an input.
  target_alphas     the same for the targets.
  input_full        modality names ('caption', 'rgb' or 'tok_rgb', ...) always given WHOLE as input (all
                    their valid tokens), on top of the Dirichlet budget shared by the other modalities.
  target_full       modality names whose every token not used as input becomes a target.
  mixture           None, or a list of dicts, one per component: 'weight' (relative probability) plus any of
                    input_budget, target_budget, input_alphas, target_alphas, input_full, target_full, which
                    override the top-level values for samples that draw this component. An empty dict
                    (besides 'weight') is the plain top-level recipe. See single_source_mixture().
  min_input_tokens  the encoder never sees fewer inputs than this (an empty encoder gave NaNs in the report's
                    code): the drawn input budget is raised to it, and every component must be able to give
                    inputs (a positive input alpha or an input_full modality).
  audio_spans       (lo, hi) inclusive: the number of contiguous audio spans drawn per sample, separately for
                    the inputs and the targets.

Properties max_input_tokens / max_target_tokens give the FIXED padded widths of a batch (static shapes for
torch.compile), large enough for every mixture component.

The report's second fix (train/inference mismatch: random Dirichlet masking almost never asks "predict a whole
modality from one other alone") is one line in a config file, e.g.

    mixture = single_source_mixture(sources=("caption", "rgb"), target="audio", weight=0.2)

which keeps the usual recipe for 80% of the samples and, for the other 20%, gives the whole caption (or the
whole rgb grid) as the only input and the whole 512-token audio stream as the target.

The algorithm follows the 4M paper and apple/ml-4m's masking (Dirichlet shares of a token budget per
modality); the audio spans, the redistribution of clamped budgets and the mixture-as-dicts are ours.
"""
import time
from dataclasses import dataclass

import torch

import modalities as M

NUM_MOD = len(M.MODALITIES)
AUDIO = M.modality_index("tok_audio")
CAPTION = M.modality_index("caption")
LENGTHS = tuple(m.length for m in M.MODALITIES)
FRAMES = M.AUDIO_FRAMES
STRIDE = M.AUDIO_CODEBOOKS          # audio tokens per frame: spans are aligned to this
# rgb, depth, normal and caption are picked together as one [B, 4, 196] block (caption padded)
NON_AUDIO = tuple(i for i in range(NUM_MOD) if i != AUDIO)
BLOCK = max(LENGTHS[i] for i in NON_AUDIO)
COMPONENT_KEYS = ("weight", "input_budget", "target_budget", "input_alphas", "target_alphas",
                  "input_full", "target_full")


@dataclass
class MaskingConfig:
    input_budget: tuple = (16, 256)
    target_budget: tuple = (16, 256)
    input_alphas: tuple = (1.0,) * NUM_MOD
    target_alphas: tuple = (1.0,) * NUM_MOD
    input_full: tuple = ()
    target_full: tuple = ()
    mixture: list = None
    min_input_tokens: int = 1
    audio_spans: tuple = (1, 4)

    def __post_init__(self):
        self.components()  # validates everything now rather than at the first batch
        lo, hi = self.audio_spans
        if not 1 <= lo <= hi:
            raise ValueError(f"audio_spans={self.audio_spans}: need 1 <= lo <= hi")
        if self.min_input_tokens < 1:
            raise ValueError(f"min_input_tokens={self.min_input_tokens}: must be >= 1")

    def components(self):
        """The mixture resolved into full components: a list of dicts with every key of COMPONENT_KEYS;
        alphas as 5 floats, full as 5 bools."""
        base = dict(weight=1.0, input_budget=self.input_budget, target_budget=self.target_budget,
                    input_alphas=self.input_alphas, target_alphas=self.target_alphas,
                    input_full=self.input_full, target_full=self.target_full)
        raw = [{}] if self.mixture is None else list(self.mixture)
        if not raw:
            raise ValueError("mixture is an empty list: use None for the plain recipe")
        out = []
        for i, comp in enumerate(raw):
            unknown = set(comp) - set(COMPONENT_KEYS)
            if unknown:
                raise ValueError(f"mixture[{i}]: unknown key(s) {sorted(unknown)}; valid: {COMPONENT_KEYS}")
            c = {**base, **comp}
            where = "MaskingConfig" if self.mixture is None else f"mixture[{i}]"
            if not c["weight"] > 0:
                raise ValueError(f"{where}: weight must be > 0, got {c['weight']}")
            for key in ("input_budget", "target_budget"):
                lo, hi = c[key]
                if not 0 <= lo <= hi:
                    raise ValueError(f"{where}: {key}={c[key]} needs 0 <= lo <= hi")
                c[key] = (int(lo), int(hi))
            for key in ("input_alphas", "target_alphas"):
                a = tuple(float(x) for x in c[key])
                if len(a) != NUM_MOD or min(a) < 0:
                    raise ValueError(f"{where}: {key} needs {NUM_MOD} values >= 0 (order "
                                     f"{', '.join(M.MODALITY_NAMES)}), got {c[key]}")
                c[key] = a
            for key in ("input_full", "target_full"):
                names = (c[key],) if isinstance(c[key], str) else tuple(c[key])
                idx = {M.modality_index(n) for n in names}
                c[key] = tuple(i in idx for i in range(NUM_MOD))
            if any(a and b for a, b in zip(c["input_full"], c["target_full"])):
                raise ValueError(f"{where}: a modality cannot be in both input_full and target_full")
            if not any(c["input_full"]) and not any(a > 0 for a in c["input_alphas"]):
                raise ValueError(f"{where}: no inputs possible (all input_alphas are 0 and no input_full); "
                                 f"the encoder would see nothing")
            out.append(c)
        return out

    @property
    def max_input_tokens(self):
        # + 1: an odd audio count is rounded up to a whole frame when rounding down would leave fewer than
        # min_input_tokens inputs
        widths = [max(c["input_budget"][1], self.min_input_tokens + 1)
                  + sum(n for n, f in zip(LENGTHS, c["input_full"]) if f) for c in self.components()]
        return min(max(widths), M.TOTAL_POSITIONS)

    @property
    def max_target_tokens(self):
        widths = [c["target_budget"][1] + sum(n for n, f in zip(LENGTHS, c["target_full"]) if f)
                  for c in self.components()]
        return max(1, min(max(widths), M.TOTAL_POSITIONS))


def single_source_mixture(sources=("caption", "rgb"), target="audio", weight=0.2):
    """A mixture: with probability 1 - weight the usual Dirichlet recipe; with probability weight one of
    `sources` (equally likely) is the WHOLE input and the whole `target` modality is the target.
    This is the report's fix for the train/inference mismatch of single-source generation."""
    if not 0 < weight < 1:
        raise ValueError(f"weight={weight}: must be in (0, 1)")
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    zeros = (0.0,) * NUM_MOD
    mix = [dict(weight=1.0 - weight)]
    for s in sources:
        mix.append(dict(weight=weight / len(sources), input_full=(s,), input_alphas=zeros, input_budget=(0, 0),
                        target_full=(target,), target_alphas=zeros, target_budget=(0, 0)))
    return mix


_TABLES = {}


def _build_tables(cfg, device):
    comps = cfg.components()
    t = lambda key, dtype: torch.tensor([c[key] for c in comps], dtype=dtype, device=device)
    return dict(weight=t("weight", torch.float32),
                input_budget=t("input_budget", torch.long), target_budget=t("target_budget", torch.long),
                input_alphas=t("input_alphas", torch.float32), target_alphas=t("target_alphas", torch.float32),
                input_full=t("input_full", torch.bool), target_full=t("target_full", torch.bool))


def _tables(cfg, device):
    # per-component parameters as device tensors, built once per (config, device): creating them on every
    # call would be a host-to-device copy, which synchronizes the CUDA stream
    key = (repr(cfg), str(device))
    if key not in _TABLES:
        if len(_TABLES) > 16:
            _TABLES.clear()
        _TABLES[key] = _build_tables(cfg, device)
    return _TABLES[key]


# ---------------------------------------------------------------------------------------------------
# random draws that take a generator (torch.distributions.Dirichlet/Gamma do not, so they are not
# reproducible from a CUDA generator)

def sample_gamma_log(alpha, generator=None, rounds=8):
    """log Gamma(alpha, 1) samples, elementwise; -inf where alpha == 0. Marsaglia-Tsang squeeze method with
    a fixed number of proposal rounds (each accepted with probability >= 0.95, so all 8 fail with
    probability < 1e-10; then the mode is used). alpha < 1 uses Gamma(a) = Gamma(a + 1) * U^(1/a), kept in
    log space so tiny alphas do not underflow."""
    small = alpha < 1
    a = torch.where(small, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    x = torch.randn((rounds,) + alpha.shape, generator=generator, device=alpha.device)
    u = torch.rand((rounds,) + alpha.shape, generator=generator, device=alpha.device)
    v = (1 + c * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
    first = ok.to(torch.uint8).argmax(0, keepdim=True)          # first accepted round (0 if none)
    g = torch.where(ok.any(0), d * v.gather(0, first).squeeze(0), d)
    logg = torch.log(g)
    ub = torch.rand(alpha.shape, generator=generator, device=alpha.device)
    logg = torch.where(small, logg + torch.log(ub.clamp_min(1e-30)) / alpha.clamp_min(1e-30), logg)
    return torch.where(alpha > 0, logg, float("-inf"))


def sample_dirichlet(alpha, generator=None):
    """alpha [B, K] >= 0 -> proportions [B, K] summing to 1 over the positive alphas; exactly 0 where
    alpha == 0; a row of all-zero alphas gives all zeros."""
    logg = sample_gamma_log(alpha, generator)
    p = torch.softmax(logg, dim=-1)
    return torch.where((alpha > 0).any(-1, keepdim=True), p, 0.0).nan_to_num(0.0)


def _uniform_int(lo, hi, generator):
    """Per-element uniform integers in [lo, hi] (LongTensors)."""
    u = torch.rand(lo.shape, generator=generator, device=lo.device)
    return torch.minimum(lo + (u * (hi - lo + 1).float()).long(), hi)


# ---------------------------------------------------------------------------------------------------
# budgets

def _split(total, w):
    """Split integer totals [B] into integer parts [B, K] proportional to weights w >= 0: floor, then the
    remainder one token each to the largest fractional parts. Parts sum to total (0 where all w are 0)."""
    s = w.sum(-1, keepdim=True)
    share = total[:, None].float() * w / s.clamp_min(1e-30)
    fl = share.floor()
    r = (total - fl.sum(-1).long()) * (s.squeeze(-1) > 0)
    frac = torch.where(w > 0, share - fl, -1.0)
    order = frac.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(w.shape[-1], device=w.device).expand_as(order))
    return fl.long() + ((rank < r[:, None]) & (w > 0)).long()


def allocate(total, p, cap, open_, min_total=None):
    """Integer token counts [B, 5] that sum to total [B] in proportion to p [B, 5], with count <= cap [B, 5]
    and count == 0 where open_ is False. What clamping frees is handed, again proportionally, to the
    modalities that still have room; after NUM_MOD - 1 rounds every modality is full or the total is met
    (each round either finishes or fills at least one more modality). If everything is full, the total is
    smaller than asked. Audio counts are then made even (whole frames): the odd token moves to another
    modality with room, or else audio rounds down (up only if that would leave fewer than min_total)."""
    alloc = torch.minimum(_split(total, p * open_), cap)
    for _ in range(NUM_MOD - 1):
        missing = total - alloc.sum(-1)
        room = open_ & (alloc < cap)
        alloc = torch.minimum(alloc + _split(missing.clamp_min(0), torch.where(room, p + 1e-6, 0.0)), cap)
    # audio parity
    odd = (alloc[:, AUDIO] % 2 == 1)
    room = open_ & (alloc < cap)
    room[:, AUDIO] = False
    has_room = room.any(-1)
    j = torch.where(room, p + 1e-6, 0.0).argmax(-1, keepdim=True)
    step = torch.zeros_like(alloc)
    step[:, AUDIO] = -odd.long()
    alloc = alloc + step
    alloc = alloc.scatter_add(-1, j, (odd & has_room).long()[:, None])
    if min_total is not None:
        up = odd & ~has_room & (alloc.sum(-1) < min_total)
        step = torch.zeros_like(alloc)
        step[:, AUDIO] = 2 * up.long()
        alloc = alloc + step
    return alloc


def _draw_counts(comp, tab, which, cap, min_total, generator):
    """Token counts per modality [B, 5] for 'input' or 'target', given per-modality capacities cap."""
    budget = tab[which + "_budget"][comp]                                    # [B, 2]
    full = tab[which + "_full"][comp]                                        # [B, 5]
    alpha = tab[which + "_alphas"][comp] * ~full                             # full ones are not shared
    whole = torch.where(full, cap, 0)
    total = _uniform_int(budget[:, 0], budget[:, 1], generator)
    if min_total is not None:
        total = torch.maximum(total, min_total - whole.sum(-1))
        min_total = min_total - whole.sum(-1)
    p = sample_dirichlet(alpha, generator)
    counts = allocate(total, p, torch.where(full, 0, cap), alpha > 0, min_total)
    return counts + whole


# ---------------------------------------------------------------------------------------------------
# audio spans

def _spans(length, n, spans_range, generator):
    """Contiguous spans along a frame axis of `length` [B] frames (<= FRAMES) covering exactly n [B] frames.
    Returns a bool mask [B, FRAMES] (only the first `length` entries of each row can be True).

    Construction: per sample draw s spans (uniform in spans_range, at most n). Cut the n chosen frames into s
    span lengths and the length - n free frames into s + 1 gaps (before, between, after the spans), each a
    random partition given by sorted uniform cut points (unused cuts sit at the end and give empty parts).
    Span i starts after gaps 0..i and spans 0..i-1. Rounding can give an empty span or an empty inner gap
    (two spans merge), so a sample has at most s runs."""
    B, device = n.shape[0], n.device
    lo, hi = spans_range
    s = _uniform_int(torch.full_like(n, lo), torch.full_like(n, hi), generator)
    s = torch.minimum(s, n.clamp_min(1))
    j = torch.arange(hi, device=device)
    u = torch.where(j[: hi - 1] < (s - 1)[:, None], torch.rand(B, hi - 1, generator=generator, device=device), 1.0)
    cuts = (u.sort(-1).values * n[:, None]).round().long()
    zero = torch.zeros(B, 1, dtype=torch.long, device=device)
    span_len = torch.diff(torch.cat([zero, cuts, n[:, None]], -1), dim=-1)            # [B, hi]
    free = length - n
    v = torch.where(j < s[:, None], torch.rand(B, hi, generator=generator, device=device), 1.0)
    gcuts = (v.sort(-1).values * free[:, None]).round().long()
    gaps = torch.diff(torch.cat([zero, gcuts, free[:, None]], -1), dim=-1)            # [B, hi + 1]
    starts = gaps[:, :hi].cumsum(-1) + span_len.cumsum(-1) - span_len
    edges = torch.zeros(B, FRAMES + 1, dtype=torch.long, device=device)
    edges.scatter_add_(-1, starts, torch.ones_like(starts))
    edges.scatter_add_(-1, starts + span_len, -torch.ones_like(starts))
    return edges.cumsum(-1)[:, :FRAMES] > 0


# ---------------------------------------------------------------------------------------------------
# the batch

def _pack(chosen, ids_all, width):
    """chosen [B, TOTAL] bool, ids_all [B, TOTAL] -> ids, pos, valid [B, width]: the chosen tokens in order."""
    B, total = chosen.shape
    device = chosen.device
    dest = torch.where(chosen, chosen.long().cumsum(-1) - 1, width)            # unchosen go to a dump column
    positions = torch.arange(total, device=device).expand(B, total)
    pos = torch.zeros(B, width + 1, dtype=torch.long, device=device).scatter_(-1, dest, positions)[:, :width]
    valid = torch.arange(width, device=device) < chosen.sum(-1, keepdim=True)
    pos = pos * valid
    return ids_all.gather(-1, pos) * valid, pos, valid


def build_batch(tokens, cfg, generator=None):
    """tokens {modality name: LongTensor [B, L_m]} -> dict enc_ids, enc_pos, enc_valid, dec_pos, dec_ids,
    dec_valid (see docs/interfaces.md), on the tokens' device. `generator` (on that device) makes it
    reproducible."""
    missing = [m.name for m in M.MODALITIES if m.name not in tokens]
    if missing:
        raise ValueError(f"build_batch: tokens lack modalities {missing}")
    ref = tokens[M.MODALITY_NAMES[0]]
    B, device = ref.shape[0], ref.device
    for m in M.MODALITIES:
        t = tokens[m.name]
        if t.shape != (B, m.length) or t.device != device:
            raise ValueError(f"build_batch: tokens[{m.name!r}] has shape {tuple(t.shape)} on {t.device}, "
                             f"expected ({B}, {m.length}) on {device}")
    tab = _tables(cfg, device)

    # 1. mixture component per sample
    if tab["weight"].shape[0] == 1:
        comp = torch.zeros(B, dtype=torch.long, device=device)
    else:
        comp = torch.multinomial(tab["weight"], B, replacement=True, generator=generator)

    # 2-3. how many tokens of each modality are inputs / targets
    cap_valid = M.caption_valid(tokens["caption"])
    avail = torch.tensor(LENGTHS, device=device).expand(B, NUM_MOD).clone()
    avail[:, CAPTION] = cap_valid.sum(-1)
    min_in = torch.full((B,), cfg.min_input_tokens, dtype=torch.long, device=device)
    n_in = _draw_counts(comp, tab, "input", avail, min_in, generator)
    n_tgt = _draw_counts(comp, tab, "target", avail - n_in, None, generator)

    # 4a. rgb / depth / normal / caption: one random order per modality over its available tokens; inputs are
    # the first n_in of that order, targets the next n_tgt (a uniform subset of what the inputs left).
    # Caption: random tokens too. It has only ~6 valid tokens ("a photo of a cat" + end-of-text) and its
    # Dirichlet share usually exceeds that, so it is mostly all-in or all-out anyway; when it is split, random
    # tokens keep the budgets exact, and the class word sits at a random place among few tokens, so spans
    # (4M's choice for long text) would buy nothing here.
    avail_blk = torch.zeros(B, len(NON_AUDIO), BLOCK, dtype=torch.bool, device=device)
    for k, i in enumerate(NON_AUDIO):
        avail_blk[:, k, :LENGTHS[i]] = True if i != CAPTION else cap_valid
    scores = torch.where(avail_blk, torch.rand(B, len(NON_AUDIO), BLOCK, generator=generator, device=device), 2.0)
    order = scores.argsort(-1)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(BLOCK, device=device).expand_as(order))
    k_in = n_in[:, NON_AUDIO, None]
    k_tgt = n_tgt[:, NON_AUDIO, None]
    blk_in = rank < k_in
    blk_tgt = (rank >= k_in) & (rank < k_in + k_tgt)

    # 4b. audio: input spans on the whole frame axis; target spans on the frames the inputs left, laid out
    # contiguously (a "compressed" axis) and mapped back, so a target span may straddle an input span.
    f_in = n_in[:, AUDIO] // STRIDE
    f_tgt = n_tgt[:, AUDIO] // STRIDE
    frames_in = _spans(torch.full_like(f_in, FRAMES), f_in, cfg.audio_spans, generator)
    left_first = torch.sort(frames_in.to(torch.uint8), dim=-1, stable=True).indices   # free frames first, in order
    frames_tgt = torch.zeros_like(frames_in).scatter_(-1, left_first, _spans(FRAMES - f_in, f_tgt, cfg.audio_spans,
                                                                               generator))
    per_token = lambda f: f[:, :, None].expand(B, FRAMES, STRIDE).reshape(B, FRAMES * STRIDE)

    # 5. pack, modality order then position order (global position = concatenation index)
    def gather_masks(blk, frames):
        parts = []
        for i in range(NUM_MOD):
            parts.append(per_token(frames) if i == AUDIO else blk[:, NON_AUDIO.index(i), :LENGTHS[i]])
        return torch.cat(parts, -1)
    ids_all = torch.cat([tokens[name] for name in M.MODALITY_NAMES], -1)
    enc_ids, enc_pos, enc_valid = _pack(gather_masks(blk_in, frames_in), ids_all, cfg.max_input_tokens)
    dec_ids, dec_pos, dec_valid = _pack(gather_masks(blk_tgt, frames_tgt), ids_all, cfg.max_target_tokens)
    return dict(enc_ids=enc_ids, enc_pos=enc_pos, enc_valid=enc_valid,
                dec_pos=dec_pos, dec_ids=dec_ids, dec_valid=dec_valid)


def random_tokens(B, device="cpu", generator=None):
    """Random token ids of the right shapes and ranges (captions of 4-15 valid ids), for tests and timing."""
    out = {}
    for m in M.MODALITIES:
        out[m.name] = torch.randint(0, min(m.vocab, M.CAPTION_PAD), (B, m.length), generator=generator, device=device)
    n_text = torch.randint(3, M.CAPTION_LEN, (B, 1), generator=generator, device=device)
    out["caption"] = torch.where(torch.arange(M.CAPTION_LEN, device=device) < n_text, out["caption"], M.CAPTION_PAD)
    return out


if __name__ == "__main__":
    # timing: python masking.py  (batch 64, default config, and with a single-source mixture)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    toks = random_tokens(64, device, g)
    for name, cfg in [("default", MaskingConfig()),
                      ("single_source_mixture", MaskingConfig(mixture=single_source_mixture()))]:
        for _ in range(5):
            build_batch(toks, cfg, g)
        if device == "cuda":
            torch.cuda.synchronize()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            build_batch(toks, cfg, g)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"{device} {name}: {(time.perf_counter() - t0) / n * 1e3:.3f} ms per batch of 64 "
              f"(widths {cfg.max_input_tokens} in, {cfg.max_target_tokens} out)")
