"""
4M-style input/target masking (after apple/ml-4m), with contiguous whole-frame spans on the audio stream (a
frame = K codebook ids; K = 2 for EnCodec: stride-2 spans).

build_batch(tokens, cfg, generator) turns one view per sample ({modality: LongTensor [B, L_m]}) into the padded
encoder/decoder batch of docs/interfaces.md. Per sample: a mixture component; an input budget split over the
modalities by Dirichlet(input_alphas), capped by what each has; the same for targets over what the inputs
left; random positions (audio: a few frame spans); the chosen tokens packed in modality, then position, order.
Sync-free and vectorized, so a GPU never waits on the host. The report's second fix is one config line:
`mixture = single_source_mixture(sources=("caption", "rgb"), target="audio", weight=0.2)`.
"""
from dataclasses import dataclass

import torch

import modalities as M

NUM_MOD = len(M.MODALITIES)
AUDIO = M.modality_index("tok_audio")
CAPTION = M.modality_index("caption")
# the audio layout (M.AUDIO_LAYOUT: frames of K ids, spans aligned to whole frames) is read at call time
# rgb, depth, normal and caption are picked together as one [B, 4, 196] block (caption padded)
NON_AUDIO = tuple(i for i in range(NUM_MOD) if i != AUDIO)
BLOCK = max(m.length for i, m in enumerate(M.MODALITIES) if i != AUDIO)


def _lengths():
    return tuple(m.length for m in M.MODALITIES)


COMPONENT_KEYS = ("weight", "input_budget", "target_budget", "input_alphas", "target_alphas", "audio_spans",
                  "input_full", "target_full")


@dataclass
class MaskingConfig:
    """train.py's `masking` setting is a dict of these fields (from_settings)."""
    input_budget: tuple = (16, 256)        # (lo, hi): input tokens per sample, uniform (input_full on top)
    target_budget: tuple = (16, 256)       # the same for targets
    # Dirichlet concentrations in modalities.MODALITIES order (rgb, depth, normal, audio, caption): 1.0 = 4M's
    # uniform mixing, small values concentrate a sample on one or two modalities, 0 = never
    input_alphas: tuple = (1.0,) * NUM_MOD
    target_alphas: tuple = (1.0,) * NUM_MOD
    input_full: tuple = ()                 # modality names always given whole as input, beside the budget
    target_full: tuple = ()                # modality names whose every non-input token is a target
    # None, or components: dicts of 'weight' plus any field above (and audio_spans) that they override
    mixture: list = None
    min_input_tokens: int = 1              # never fewer inputs (an empty encoder gave NaNs in the report)
    audio_spans: tuple = (1, 4)            # (lo, hi) contiguous audio spans per sample, inputs and targets each
    mixture_per_batch: bool = False        # one component per batch: one shape, so a CPU trims padding

    def __post_init__(self):
        self.components()  # validates everything now rather than at the first batch
        if self.min_input_tokens < 1:
            raise ValueError(f"min_input_tokens={self.min_input_tokens}: must be >= 1")

    def components(self):
        """The mixture, validated, as full dicts of COMPONENT_KEYS (alphas: 5 floats, full: 5 bools)."""
        base = dict(weight=1.0, input_budget=self.input_budget, target_budget=self.target_budget,
                    input_alphas=self.input_alphas, target_alphas=self.target_alphas,
                    input_full=self.input_full, target_full=self.target_full, audio_spans=self.audio_spans)
        raw = [{}] if self.mixture is None else list(self.mixture)
        if not raw:
            raise ValueError("mixture is an empty list: use None for the plain recipe")
        out = []
        for i, comp in enumerate(raw):
            where = "MaskingConfig" if self.mixture is None else f"mixture[{i}]"
            unknown = set(comp) - set(COMPONENT_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {COMPONENT_KEYS}")
            c = {**base, **comp}
            for key, lo_min, hi_max in (("input_budget", 0, None), ("target_budget", 0, None),
                                        ("audio_spans", 1, M.AUDIO_FRAMES)):
                lo, hi = c[key]
                if not lo_min <= lo <= hi or (hi_max is not None and hi > hi_max):
                    raise ValueError(f"{where}: {key}={c[key]} needs {lo_min} <= lo <= hi"
                                     + (f" <= {hi_max}" if hi_max else ""))
                c[key] = (int(lo), int(hi))
            for key in ("input_alphas", "target_alphas"):
                c[key] = tuple(float(x) for x in c[key])
                if len(c[key]) != NUM_MOD or min(c[key]) < 0:
                    raise ValueError(f"{where}: {key} needs {NUM_MOD} values >= 0 (order "
                                     f"{', '.join(M.MODALITY_NAMES)}), got {comp.get(key, base[key])}")
            for key in ("input_full", "target_full"):
                idx = {M.modality_index(n) for n in ((c[key],) if isinstance(c[key], str) else c[key])}
                c[key] = tuple(i in idx for i in range(NUM_MOD))
            if not c["weight"] > 0:
                raise ValueError(f"{where}: weight must be > 0, got {c['weight']}")
            if any(a and b for a, b in zip(c["input_full"], c["target_full"])):
                raise ValueError(f"{where}: a modality cannot be in both input_full and target_full")
            if not any(c["input_full"]) and not any(a > 0 for a in c["input_alphas"]):
                raise ValueError(f"{where}: no inputs possible (all input_alphas are 0 and no input_full); "
                                 f"the encoder would see nothing")
            out.append(c)
        return out

    @classmethod
    def from_settings(cls, settings):
        """From train.py's settings (or a checkpoint's 'config'): its 'masking' dict, or older flat fields."""
        fields = set(cls.__dataclass_fields__)
        if isinstance(settings.get("masking"), dict):
            unknown = set(settings["masking"]) - fields
            if unknown:
                raise ValueError(f"unknown masking setting(s) {sorted(unknown)}; valid: {', '.join(sorted(fields))}")
            return cls(**settings["masking"])
        return cls(**{k: v for k, v in settings.items() if k in fields})

    @property
    def max_input_tokens(self):
        # + K - 1: a partial audio frame is rounded up to a whole frame when rounding down would leave fewer
        # than min_input_tokens inputs
        widths = [max(c["input_budget"][1], self.min_input_tokens + M.AUDIO_CODEBOOKS - 1)
                  + sum(n for n, f in zip(_lengths(), c["input_full"]) if f) for c in self.components()]
        return min(max(widths), M.TOTAL_POSITIONS)

    @property
    def max_target_tokens(self):
        widths = [c["target_budget"][1] + sum(n for n, f in zip(_lengths(), c["target_full"]) if f)
                  for c in self.components()]
        return max(1, min(max(widths), M.TOTAL_POSITIONS))

    @property
    def max_audio_spans(self):   # from the raw settings: components() would re-validate on every batch
        return max(int(c.get("audio_spans", self.audio_spans)[1]) for c in (self.mixture or [{}]))


def single_source_mixture(sources=("caption", "rgb"), target="audio", weight=0.2):
    """The report's fix for the train/inference mismatch: with probability weight, one of `sources` whole in
    and the whole `target` out; else the usual Dirichlet recipe."""
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
    w = torch.tensor([c["weight"] for c in comps], dtype=torch.float64)
    return dict(cum_weight=(w.cumsum(0) / w.sum()).float().to(device),
                lengths=torch.tensor(_lengths(), device=device),
                non_audio=torch.tensor(NON_AUDIO, device=device),
                is_caption=torch.arange(NUM_MOD, device=device) == CAPTION,
                grid_block=torch.ones(BLOCK, dtype=torch.bool, device=device),
                block_arange=torch.arange(BLOCK, device=device),
                positions=torch.arange(M.TOTAL_POSITIONS, device=device),
                width_arange=torch.arange(M.TOTAL_POSITIONS + 1, device=device),
                input_budget=t("input_budget", torch.long), target_budget=t("target_budget", torch.long),
                input_alphas=t("input_alphas", torch.float32), target_alphas=t("target_alphas", torch.float32),
                input_full=t("input_full", torch.bool), target_full=t("target_full", torch.bool),
                audio_spans=t("audio_spans", torch.long))


def _tables(cfg, device):
    # device tensors built once per (config, device): a copy per call would sync the CUDA stream (never
    # evicted: captured CUDA graphs read them)
    key = (repr(cfg), str(device), M.AUDIO_LAYOUT)
    if key not in _TABLES:
        _TABLES[key] = _build_tables(cfg, device)
    return _TABLES[key]


# ---------------------------------------------------------------------------------------------------
# random draws: one uniform and one normal tensor per batch, sliced (on a GPU, launches are the cost); our own
# Gamma sampler, since torch.distributions' takes no generator

GAMMA_ROUNDS = 8


def gamma_log(alpha, x, u, ub):
    """log Gamma(alpha, 1), elementwise, from draws x ~ N(0, 1), u ~ U(0, 1) [GAMMA_ROUNDS, *alpha.shape] and
    ub ~ U(0, 1) [alpha.shape]; -inf where alpha == 0. Marsaglia-Tsang with a fixed 8 rounds (all fail with
    p < 1e-10: then the mode); alpha < 1 via Gamma(a + 1) * U^(1/a), in log space so tiny alphas never underflow."""
    small = alpha < 1
    a = torch.where(small, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    v = (1 + c * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
    first = ok.to(torch.uint8).argmax(0, keepdim=True)          # first accepted round (0 if none)
    g = torch.where(ok.any(0), d * v.gather(0, first).squeeze(0), d)
    logg = torch.log(g) + torch.where(small, torch.log(ub.clamp_min(1e-30)) / alpha.clamp_min(1e-30), 0.0)
    return torch.where(alpha > 0, logg, float("-inf"))


def dirichlet(alpha, x, u, ub):
    """alpha [..., K] >= 0 -> float64 proportions summing to 1 over the positive alphas; exactly 0 where
    alpha == 0; all zeros for an all-zero row. Draws as for gamma_log."""
    alpha = alpha.double()
    p = torch.softmax(gamma_log(alpha, x.double(), u.double(), ub.double()), dim=-1)
    return torch.where((alpha > 0).any(-1, keepdim=True), p, 0.0)


def _uniform_int(lo, hi, u):
    """Per-element uniform integers in [lo, hi] (LongTensors) from uniforms u."""
    return torch.minimum(lo + (u * (hi - lo + 1)).long(), hi)


# ---------------------------------------------------------------------------------------------------
# budgets

def _rank_desc(v):
    """Descending rank of each entry of v [B, K], ties to the lower index (pairwise: cheaper than a sort)."""
    idx = torch.arange(v.shape[-1], device=v.device)
    before = (v[:, None, :] > v[:, :, None]) | ((v[:, None, :] == v[:, :, None]) & (idx < idx[:, None]))
    return before.sum(-1)


def allocate(total, p, cap, min_total=None):
    """Integer counts [B, 5] summing to total [B] (or all there is), in proportion to p [B, 5] (float64),
    each at most cap [B, 5]. Water-filling in closed form: shares min(lam * p_i, cap_i), lam found by comparing
    the breakpoints cap_i / p_i pairwise; floor, then the leftover to the largest fractions. Audio is then
    made whole frames: its count % K spare ids move to a modality with room, else audio rounds down (up if that
    would leave fewer than min_total)."""
    capf = cap.double()
    use = p > 0
    fill_at = torch.where(use, capf / p.clamp_min(1e-300), 1e300)                                  # [B, 5]
    handed = torch.minimum(capf[:, None, :], fill_at[:, :, None] * p[:, None, :]).sum(-1)        # at each breakpoint
    lam_hi = torch.where(handed >= total[:, None], fill_at, 1e300).amin(-1, keepdim=True)
    full = use & (fill_at < lam_hi)
    rest = total - (capf * full).sum(-1)
    den = (p * (use & ~full)).sum(-1)
    lam = torch.where(den > 0, rest / den.clamp_min(1e-300), 0.0)
    x = torch.where(full, capf, torch.minimum(lam[:, None] * p, capf))
    goal = torch.minimum(total, (cap * use).sum(-1))
    fl = x.floor().long()
    frac = torch.where(use & (fl < cap), x - fl, -1.0)
    alloc = fl + ((_rank_desc(frac) < (goal - fl.sum(-1))[:, None]) & (frac >= 0)).long()
    # audio in whole frames of K ids
    K = M.AUDIO_CODEBOOKS
    audio = torch.arange(NUM_MOD, device=p.device) == AUDIO
    spare = alloc[:, AUDIO] % K                                                                      # [B]
    odd = spare > 0
    room = use & (cap - alloc >= spare[:, None]) & ~audio
    has_room = room.any(-1)
    j = torch.where(room, p, -1.0).argmax(-1, keepdim=True)
    alloc = alloc - (spare[:, None] * audio).long()
    alloc = alloc.scatter_add(-1, j, (spare * has_room)[:, None])
    if min_total is not None:
        up = odd & ~has_room & (alloc.sum(-1) < min_total)
        alloc = alloc + K * (up[:, None] & audio).long()
    return alloc


def _draw_counts(comp, tab, which, cap, p, u, min_total):
    """Token counts per modality [B, 5] for 'input' or 'target': p the Dirichlet proportions, u [B] the
    uniform for the budget, cap [B, 5] what each modality has left."""
    budget = tab[which + "_budget"][comp]                                    # [B, 2]
    full = tab[which + "_full"][comp]                                        # [B, 5]
    whole = torch.where(full, cap, 0)                                        # taken whole, outside the budget
    total = _uniform_int(budget[:, 0], budget[:, 1], u)
    if min_total is not None:
        min_total = min_total - whole.sum(-1)
        total = torch.maximum(total, min_total)
    return allocate(total, torch.where(full, 0.0, p), torch.where(full, 0, cap), min_total) + whole


# ---------------------------------------------------------------------------------------------------
# audio spans

def _spans(length, n, u, lo, hi):
    """Bool mask [N, T] of contiguous spans covering exactly n [N] of the first `length` [N] frames, from
    uniforms u [N, 2 * H] (H >= every hi); lo, hi [N]: each row's range of span counts. s spans cut the n
    frames, s + 1 gaps cut the rest, each by sorted uniform cut points (rounding may merge spans: <= s runs)."""
    N, device = n.shape[0], n.device
    H = u.shape[1] // 2
    s = torch.minimum(lo + (u[:, 0] * (hi - lo + 1)).long(), hi)
    s = torch.minimum(s, n.clamp_min(1))
    j = torch.arange(H, device=device)
    cut_u = torch.where(j[: H - 1] < (s - 1)[:, None], u[:, 1:H], 1.0)
    gap_u = torch.where(j < s[:, None], u[:, H:2 * H], 1.0)
    zero = torch.zeros(N, 1, dtype=torch.long, device=device)
    cuts = (cut_u.sort(-1).values * n[:, None]).round().long()
    span_len = torch.diff(cuts, dim=-1, prepend=zero, append=n[:, None])                    # [N, H]
    free = length - n
    gcuts = (gap_u.sort(-1).values * free[:, None]).round().long()
    gaps = torch.diff(gcuts, dim=-1, prepend=zero, append=free[:, None])                     # [N, H + 1]
    starts = gaps[:, :H].cumsum(-1) + span_len.cumsum(-1) - span_len
    T = M.AUDIO_FRAMES
    edges = torch.zeros(N, T + 1, dtype=torch.long, device=device)
    edges.scatter_add_(-1, torch.cat([starts, starts + span_len], -1),
                       torch.cat([torch.ones_like(starts), -torch.ones_like(starts)], -1))
    return edges.cumsum(-1)[:, :T] > 0


# ---------------------------------------------------------------------------------------------------
# the batch

def build_batch(tokens, cfg, generator=None, cuda_graph=True):
    """tokens {modality name: LongTensor [B, L_m]} -> dict enc_ids, enc_pos, enc_valid, dec_pos, dec_ids,
    dec_valid (docs/interfaces.md) on the tokens' device, reproducible from `generator`. On CUDA with
    cuda_graph=True, replayed as one CUDA graph (fastpath.graphed_batch): the same batch, fewer launches."""
    missing = [m.name for m in M.MODALITIES if m.name not in tokens]
    if missing:
        raise ValueError(f"build_batch: tokens lack modalities {missing}")
    ref = tokens[M.MODALITY_NAMES[0]]
    B, device = ref.shape[0], ref.device
    for m in M.MODALITIES:
        t = tokens[m.name]
        if t.shape != (B, m.length) or t.device != device or t.dtype != torch.long:
            raise ValueError(f"build_batch: tokens[{m.name!r}] is {t.dtype} {tuple(t.shape)} on {t.device}, "
                             f"expected torch.int64 ({B}, {m.length}) on {device}")
    n_u, n_z = _num_draws(cfg)
    if device.type == "cuda" and cuda_graph:     # the fast path (fastpath.py): one CUDA graph, replayed
        import fastpath
        batch = fastpath.graphed_batch(tokens, cfg, generator, B, device)
        if batch is not None:
            return batch
    U = torch.rand(B, n_u, generator=generator, device=device)
    Z = torch.randn(B, n_z, generator=generator, device=device)
    return _assemble(tokens, U, Z, cfg)


def _draw_sizes(cfg):
    """How many uniforms per sample each step takes (slices of one [B, n] draw)."""
    return dict(comp=1, budget=2, gamma=GAMMA_ROUNDS * 2 * NUM_MOD, boost=2 * NUM_MOD,
                scores=len(NON_AUDIO) * BLOCK, spans=2 * 2 * cfg.max_audio_spans)


def _num_draws(cfg):
    """(uniforms, normals) per sample."""
    return sum(_draw_sizes(cfg).values()), GAMMA_ROUNDS * 2 * NUM_MOD


def _assemble(tokens, U, Z, cfg):
    """The batch from the tokens and the random numbers U (uniform [B, n_u]) and Z (normal [B, n_z]).
    Deterministic, static shapes, no host sync: capturable as a CUDA graph."""
    B, device = U.shape[0], U.device
    tab = _tables(cfg, device)
    n_blk = len(NON_AUDIO)
    sp = 2 * cfg.max_audio_spans
    u, at = {}, 0
    for key, n in _draw_sizes(cfg).items():
        u[key], at = U[:, at:at + n], at + n

    # 1. mixture component per sample: inverse CDF of the weights (torch.multinomial would sync on CUDA)
    u_comp = u["comp"][:1].expand(B, 1) if cfg.mixture_per_batch else u["comp"]
    comp = (u_comp >= tab["cum_weight"][:-1]).sum(-1)

    # 2-3. Dirichlet proportions for inputs and targets at once ([B, 2, 5]); how many tokens of each modality
    # are inputs, then targets from what the inputs left
    alphas = torch.stack([tab["input_alphas"][comp] * ~tab["input_full"][comp],
                          tab["target_alphas"][comp] * ~tab["target_full"][comp]], 1)
    to_rounds = lambda t: t.view(B, GAMMA_ROUNDS, 2, NUM_MOD).transpose(0, 1)
    p = dirichlet(alphas, to_rounds(Z), to_rounds(u["gamma"]), u["boost"].view(B, 2, NUM_MOD))
    cap_valid = M.caption_valid(tokens["caption"])
    avail = torch.where(tab["is_caption"], cap_valid.sum(-1, keepdim=True), tab["lengths"])          # [B, 5]
    n_in = _draw_counts(comp, tab, "input", avail, p[:, 0], u["budget"][:, 0], cfg.min_input_tokens)
    n_tgt = _draw_counts(comp, tab, "target", avail - n_in, p[:, 1], u["budget"][:, 1], None)

    # 4a. rgb / depth / normal / caption: one random order per modality; inputs are its first n_in, targets the
    # next n_tgt. Random tokens for the 16-id caption too: spans (4M's choice for long text) buy nothing here.
    cap_row = torch.nn.functional.pad(cap_valid, (0, BLOCK - M.CAPTION_LEN))
    avail_blk = torch.cat([tab["grid_block"].expand(B, n_blk - 1, BLOCK), cap_row[:, None]], 1)    # [B, 4, BLOCK]
    scores = torch.where(avail_blk, u["scores"].view(B, n_blk, BLOCK), 2.0)
    order = scores.argsort(-1)
    rank = torch.empty_like(order).scatter_(-1, order, tab["block_arange"].expand_as(order))
    k_in = n_in.index_select(1, tab["non_audio"])[:, :, None]       # (a tuple index would copy host -> device)
    k_end = k_in + n_tgt.index_select(1, tab["non_audio"])[:, :, None]
    blk = torch.stack([rank < k_in, (rank >= k_in) & (rank < k_end)], 0)                          # [2, B, 4, BLOCK]

    # 4b. audio: input spans on the frame axis; target spans on the frames the inputs left, laid out
    # contiguously and mapped back (a target span may straddle an input span); one call for both.
    FRAMES, K = M.AUDIO_FRAMES, M.AUDIO_CODEBOOKS
    f_in = n_in[:, AUDIO] // K
    f_tgt = n_tgt[:, AUDIO] // K
    spans = tab["audio_spans"][comp].repeat(2, 1)                                                    # [2B, 2]
    frames = _spans(torch.cat([torch.full_like(f_in, FRAMES), FRAMES - f_in]), torch.cat([f_in, f_tgt]),
                    u["spans"].view(B, 2, sp).transpose(0, 1).reshape(2 * B, sp),
                    spans[:, 0], spans[:, 1]).view(2, B, FRAMES)
    free = ~frames[0]
    slot = (free.long().cumsum(-1) - 1).clamp_min(0)             # index of each free frame on the compressed axis
    frames = torch.stack([frames[0], free & frames[1].gather(-1, slot)], 0)                        # [2, B, FRAMES]
    audio_tok = frames[..., None].expand(2, B, FRAMES, K).reshape(2, B, FRAMES * K)

    # 5. pack inputs and targets, modality order then position order (global position = concatenation index)
    parts = [audio_tok if i == AUDIO else blk[:, :, NON_AUDIO.index(i), :m.length]
             for i, m in enumerate(M.MODALITIES)]
    chosen = torch.cat(parts, -1)                                                                   # [2, B, TOTAL]
    width = max(cfg.max_input_tokens, cfg.max_target_tokens)
    dest = torch.where(chosen, chosen.long().cumsum(-1) - 1, width)              # unchosen go to a dump column
    pos = torch.zeros(2, B, width + 1, dtype=torch.long, device=device)
    pos = pos.scatter_(-1, dest, tab["positions"].expand(2, B, M.TOTAL_POSITIONS))[..., :width]
    valid = tab["width_arange"][:width] < chosen.sum(-1, keepdim=True)
    pos = pos * valid
    ids_all = torch.cat([tokens[name] for name in M.MODALITY_NAMES], -1)
    # as targets, the caption's trailing padding is queried but not scored (modalities.caption_scored)
    tgt_all = torch.cat([ids_all[:, :-M.CAPTION_LEN], M.caption_targets(tokens["caption"])], -1)
    ids = torch.stack([ids_all, tgt_all]).gather(-1, pos) * valid
    ni, no = cfg.max_input_tokens, cfg.max_target_tokens
    return dict(enc_ids=ids[0, :, :ni].contiguous(), enc_pos=pos[0, :, :ni].contiguous(),
                enc_valid=valid[0, :, :ni].contiguous(), dec_pos=pos[1, :, :no].contiguous(),
                dec_ids=ids[1, :, :no].contiguous(), dec_valid=valid[1, :, :no].contiguous())


def trim_padding(batch):
    """Drop the padded columns no sample uses: fixed widths serve torch.compile and the GPU, not a CPU."""
    n_in = int(batch['enc_valid'].sum(1).max())
    n_out = max(int(batch['dec_valid'].sum(1).max()), 1)
    return {k: v[:, :n_in] if k.startswith('enc') else v[:, :n_out] for k, v in batch.items()}


def random_tokens(B, device="cpu", generator=None):
    """Random token ids of the right shapes and ranges (captions of 4-15 valid ids), for tests and timing."""
    out = {}
    for m in M.MODALITIES:
        out[m.name] = torch.randint(0, min(m.vocab, M.CAPTION_PAD), (B, m.length), generator=generator, device=device)
    n_text = torch.randint(3, M.CAPTION_LEN, (B, 1), generator=generator, device=device)
    out["caption"] = torch.where(torch.arange(M.CAPTION_LEN, device=device) < n_text, out["caption"], M.CAPTION_PAD)
    return out


def kept_first(keep, *columns):
    """Each row's kept entries first, in their order, sync-free: (valid, columns gathered, 0 past the kept)."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    valid = keep.gather(1, order)
    return valid, [c.gather(1, order) * valid for c in columns]


def condition_dropout(batch, rate, generator=None):
    """Guidance's training half: with probability `rate` a sample loses every input of the modalities it has no
    target in; one left with none gets the null token (modalities.NULL_ID), the unconditional input
    generation.generate feeds. Kept inputs stay packed first; returns a new dict, sync-free."""
    if rate <= 0:
        return batch
    enc_ids, enc_pos, enc_valid = batch["enc_ids"], batch["enc_pos"], batch["enc_valid"]
    B, device = enc_ids.size(0), enc_ids.device
    gdev = generator.device if generator is not None else device
    drop = (torch.rand(B, generator=generator, device=gdev) < rate).to(device)
    tmod = torch.where(batch["dec_valid"], M.position_modality(batch["dec_pos"]), NUM_MOD)
    targeted = torch.zeros(B, NUM_MOD + 1, dtype=torch.bool, device=device).scatter_(1, tmod, True)
    keep = enc_valid & (~drop[:, None] | targeted.gather(1, M.position_modality(enc_pos)))
    valid, (ids, pos) = kept_first(keep, enc_ids, enc_pos)
    empty = ~valid[:, 0]
    first = torch.arange(ids.size(1), device=device)[None] == 0
    null = empty[:, None] & first
    ids = torch.where(null, M.NULL_ID, ids)
    pos = torch.where(null, M.null_position(targeted[:, CAPTION])[:, None], pos)
    return dict(batch, enc_ids=ids, enc_pos=pos, enc_valid=valid | null)
