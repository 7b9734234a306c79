"""
The nano4M encoder-decoder, in one file.

Inputs are (id, global position) pairs chosen by masking.py; targets are global positions whose ids the decoder
predicts. An embedding is token + modality + position, read off the global position (modalities.py). Decoder
queries (a mask token + modality + position) attend to each other within their modality, as in 4M, and
cross-attend to the encoder. The loss: each modality's mean CE over its scored targets, then the mean over the
modalities present, so 512 audio ids do not drown a 5-id caption; in float32 (a bf16 softmax over 50k ids gave
NaNs in the report). head='full' is the report's one softmax over all ids.

Beside it: adapters.py (ToyZoo's embedding adapters and factored head), locality.py (local positions and
cross-attention), fastpath.py (the same loss, hand-written autograd; FLOPs and MFU), packing.py (real tokens only).

    model = Nano4M(Nano4MConfig())
    loss, per_modality = model(enc_ids, enc_pos, enc_valid, dec_pos, dec_valid, dec_ids)
"""
import inspect
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

import modalities as M
from modalities import MODALITY_NAMES, GRID, VOCAB_SIZE, position_modality


@dataclass
class Nano4MConfig:
    n_enc_layer: int = 6
    n_dec_layer: int = 6
    n_embd: int = 512
    n_head: int = 8             # head dim 64
    dropout: float = 0.0
    bias: bool = False          # bias in Linears and LayerNorms
    vocab_size: int = VOCAB_SIZE
    dec_same_modality: bool = True  # decoder self-attention only among targets of the same modality (4M)
    head: str = 'modality'      # a softmax over each modality's own ids; 'full': the report's, over all ids
    pos_emb: str = 'learned'    # factorised row/col, frame/codebook, index; 'sincos': the report's fixed 1-D table;
                                # 'sincos_layout': fixed 2-D on the grids, 1-D over audio frames (locality.py)
    mimetic_cross: float = 0.0  # > 0: cross-attention's W_q, W_k start at this times I plus their init (locality.py)
    cross_local: float = 0.0    # > 0: half the cross-attention heads pay this per place to a key (locality.py)
    adapters: dict = None       # None: the report's model; a dict of adapters.AdapterConfig: ToyZoo's


class Attention(nn.Module):
    """Multi-head attention through fused SDPA. Self-attention when context is None, else cross-attention.
    attn_mask: bool, True = may attend, broadcastable to [B, n_head, T_query, T_key]; or, on the packed path,
    a packing.Segments (x is then [1, T, C], every sample's real tokens one after another)."""

    def __init__(self, config, cross=False):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.n_embd, self.cross = config.n_head, config.n_embd, cross
        if cross:
            self.q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        else:
            self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def qkv_heads(self, x, context=None):
        """(q, k, v), each [B, n_head, T, head dim]: k and v from context in cross-attention."""
        if self.cross:
            q, (k, v) = self.q(x), self.kv(context).split(self.n_embd, dim=2)
        else:
            q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        return tuple(t.view(t.size(0), t.size(1), self.n_head, self.n_embd // self.n_head).transpose(1, 2)
                     for t in (q, k, v))

    def forward(self, x, attn_mask, context=None):
        B, T, C = x.shape
        q, k, v = self.qkv_heads(x, context)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(attn_mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        else:   # packed (packing.Segments): each segment attends within itself
            y = attn_mask.attend(q, k, v, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class EncoderBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.self_attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.cross_attn = Attention(config, cross=True)
        self.ln_3 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, memory, self_mask, cross_mask):
        x = x + self.self_attn(self.ln_1(x), self_mask)
        x = x + self.cross_attn(self.ln_2(x), cross_mask, context=memory)
        return x + self.mlp(self.ln_3(x))


class Nano4M(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        D = config.n_embd
        # the modality table of the audio layout in force (modalities.load_meta sets it from the dataset)
        self.modalities = MODALITIES = M.MODALITIES
        if config.pos_emb not in ("learned", "sincos", "sincos_layout"):
            raise ValueError(f"pos_emb={config.pos_emb!r}: expected 'learned', 'sincos' or 'sincos_layout'")
        if config.head not in ("modality", "full"):
            raise ValueError(f"head={config.head!r}: expected 'modality' or 'full'")
        # modality m's ids read (and its logits come from) rows [row_offset[m], row_offset[m] + vocab_m):
        # one shared table (the report's), unless the adapters give each modality rows of its own
        rows, self.row_offset = config.vocab_size, [0] * len(MODALITIES)
        if config.adapters:
            import adapters as adapters_lib
            rows, self.row_offset = adapters_lib.vocab_rows(config.adapters)
        self.wte = nn.Embedding(rows, D)                         # token embedding
        self.wme = nn.Embedding(len(MODALITIES), D)             # which modality a token belongs to
        learned = []
        if config.pos_emb != "sincos":
            # position parts; the three image grids share row/col (they are pixel-aligned views of one frame)
            if config.pos_emb == "learned":
                self.pos_row = nn.Parameter(torch.zeros(GRID, D))
                self.pos_col = nn.Parameter(torch.zeros(GRID, D))
                self.pos_frame = nn.Parameter(torch.zeros(M.AUDIO_FRAMES, D))    # stream index i -> frame i // K
                learned = [self.pos_row, self.pos_col, self.pos_frame]
            else:   # fixed, near places alike: a query starts out most like the keys at and around its place
                import locality
                self.register_buffer("pos_grid", locality.sincos_grid(GRID, D), persistent=False)
                self.register_buffer("pos_frame", locality.local_sincos(M.AUDIO_FRAMES, D), persistent=False)
            self.pos_codebook = nn.Parameter(torch.zeros(M.AUDIO_CODEBOOKS, D))  # ... and codebook i % K
            seq_lengths = {m.length for m in MODALITIES if m.layout == "seq"}
            self.pos_seq = nn.Parameter(torch.zeros(max(seq_lengths), D))      # caption index
            learned += [self.pos_codebook, self.pos_seq]
        else:   # fixed, so not saved: it follows from the width
            self.register_buffer("pos_sincos", sincos_table(M.TOTAL_POSITIONS, D), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(D))                      # the decoder query content
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList([EncoderBlock(config) for _ in range(config.n_enc_layer)])
        self.enc_ln_f = nn.LayerNorm(D, bias=config.bias)
        self.decoder = nn.ModuleList([DecoderBlock(config) for _ in range(config.n_dec_layer)])
        self.dec_ln_f = nn.LayerNorm(D, bias=config.bias)
        self.lm_head = nn.Linear(D, rows, bias=False)           # untied; the same rows per modality as wte
        # ToyZoo's embedding adapters (adapters.py; None: the report's model), made last so that the weights
        # above draw the same random numbers with or without them
        self.adapters = adapters_lib.EmbeddingAdapters(config.adapters, D, config.bias) if config.adapters else None
        if self.adapters is not None and self.adapters.factors and config.head == "full":
            raise ValueError("adapters' factored_head needs head='modality'")
        self.register_buffer("pos_modality", position_modality(torch.arange(M.TOTAL_POSITIONS)), persistent=False)
        # the head row offset of each global position's modality (all zero with the shared table)
        self.register_buffer("pos_row_offset", torch.tensor(self.row_offset)[self.pos_modality], persistent=False)
        # how a step is computed, not what (train.py / bench.py set them): fastpath.py's head, packing.py's
        # trunk on real tokens, fastpath's static-shape head. All give the same numbers.
        self.fast, self.packed, self.static_head = False, False, False

        # GPT-2's init, unless the adapters keep PyTorch's own Linear init (init='torch', adapters.py)
        gpt2 = self.adapters is None or self.adapters.cfg.init == "gpt2"
        self.apply(lambda module: self._init_weights(module, gpt2))
        for p in learned + [self.mask_token]:
            nn.init.normal_(p, mean=0.0, std=0.02)
        # GPT-2's scaled init of the projections that write into the residual stream
        n_resid = 2 * config.n_enc_layer + 3 * config.n_dec_layer
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and gpt2:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_resid))
        if config.mimetic_cross or config.cross_local:   # where cross-attention looks (locality.py)
            import locality
            locality.setup(self)

    def _init_weights(self, module, gpt2=True):
        if isinstance(module, nn.Linear) and gpt2:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    # -----------------------------------------------------------------------------------------------
    # the trunk: static shapes, no host syncs, so torch.compile can take it whole

    def position_table(self):
        """[TOTAL_POSITIONS, D]: each modality's position embedding, concatenated in global-position order."""
        if self.config.pos_emb == "sincos":
            return self.pos_sincos
        D = self.config.n_embd
        grid = self.pos_grid if self.config.pos_emb == "sincos_layout" else \
            (self.pos_row[:, None, :] + self.pos_col[None, :, :]).reshape(GRID * GRID, D)
        audio = (self.pos_frame[:, None, :] + self.pos_codebook[None, :, :]).reshape(-1, D)
        parts = {"grid": grid, "audio": audio}
        return torch.cat([parts[m.layout] if m.layout in parts else self.pos_seq[:m.length]
                          for m in self.modalities])

    def embed(self, enc_ids, enc_pos, enc_valid, dec_pos):
        """-> (encoder input embeddings [B, Ni, D], decoder query embeddings [B, No, D])."""
        # modality + position embedding of every global position, summed once over the 1,316 positions, so
        # each token takes one gather rather than two (the modality follows from the position anyway)
        pos_table = self.position_table() + self.wme(self.pos_modality)
        if self.adapters is None:
            content = self.wte(enc_ids)
        else:   # the one seam of ToyZoo's embedding adapters (adapters.py)
            content = self.adapters.embed_inputs(self.wte, enc_ids, enc_pos, enc_valid)
        # F.embedding, not pos_table[pos]: its backward sums repeated positions in a fixed order, where indexing's
        # order varies between runs on a multi-threaded CPU (so a seed would not give the same curve twice)
        x = self.drop(F.embedding(enc_pos, pos_table) + content)
        y = self.drop(self.mask_token + F.embedding(dec_pos, pos_table))
        return x, y

    def decode_hidden(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid):
        """-> decoder output [B, No, D] (after the final LayerNorm), one row per target position."""
        if self.packed and not self.config.cross_local:   # the same numbers on real tokens only (packing.py)
            import packing
            if packing.can_pack(enc_valid, dec_valid):
                return packing.decode_hidden_packed(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid)
        device = enc_ids.device
        x, y = self.embed(enc_ids, enc_pos, enc_valid, dec_pos)
        Ni, No = enc_ids.size(1), dec_pos.size(1)

        # Every query row must keep at least one key or SDPA returns NaN for it (and NaN grads leak into
        # the shared weights). Padding rows may always see themselves; valid rows see valid keys (which
        # include themselves), so the padding never changes what a valid token computes.
        eye_i = torch.eye(Ni, dtype=torch.bool, device=device)
        enc_mask = (enc_valid[:, None, :] | eye_i)[:, None]                       # [B, 1, Ni, Ni]
        for block in self.encoder:
            x = block(x, enc_mask)
        memory = self.enc_ln_f(x)

        dec_mod = self.pos_modality[dec_pos]
        eye_o = torch.eye(No, dtype=torch.bool, device=device)
        dec_mask = dec_valid[:, None, :].expand(-1, No, -1)
        if self.config.dec_same_modality:
            dec_mask = dec_mask & (dec_mod[:, :, None] == dec_mod[:, None, :])
        dec_mask = (dec_mask | eye_o)[:, None]                                    # [B, 1, No, No]
        cross_mask = self.cross_attn_mask(enc_pos, enc_valid, dec_pos)
        for block in self.decoder:
            y = block(y, memory, dec_mask, cross_mask)
        return self.dec_ln_f(y)

    def cross_attn_mask(self, enc_pos, enc_valid, dec_pos):
        """The decoder's cross-attention keys: the valid inputs (a sample with none -- masking forbids it, but a
        direct caller may not -- falls back to key 0 so its rows stay finite), bool [B, 1, 1, Ni]; with
        cross_local, an additive float mask with local heads (locality.cross_local_mask)."""
        first = torch.arange(enc_pos.size(1), device=enc_pos.device) == 0
        mask = (enc_valid | (first & ~enc_valid.any(dim=1, keepdim=True)))[:, None, None, :]
        if self.config.cross_local:   # locality.py
            import locality
            return locality.cross_local_mask(self, mask, enc_pos, dec_pos)
        return mask

    # -----------------------------------------------------------------------------------------------
    # the head: per-modality logits over the modality's own ids (or every row, head='full'), in float32

    def modality_logits(self, h, m):
        """h [..., D] decoder rows of modality index m -> float32 logits [..., vocab_m]."""
        start = self.row_offset[m]
        if self.adapters is not None and m in self.adapters.factors:   # ToyZoo's factored head (adapters.py)
            return self.adapters.factored_logits(h, self.lm_head.weight[start:], m)
        with torch.autocast(device_type=h.device.type, enabled=False):
            return h.float() @ self.lm_head.weight[start:start + self.modalities[m].vocab].float().t()

    def target_modality(self, dec_pos, dec_valid, dec_ids=None):
        """Modality index of every target slot; len(MODALITY_NAMES) for the padding slots and for the queried
        but unscored ones (dec_ids == IGNORE_ID, the caption's trailing padding)."""
        scored = dec_valid if dec_ids is None else dec_valid & (dec_ids >= 0)
        return torch.where(scored, self.pos_modality[dec_pos], len(self.modalities))

    def loss(self, h, dec_pos, dec_ids, dec_valid):
        """-> (loss, {name: (sum_ce, count)}): each modality's mean CE over its scored targets, then the mean
        over the modalities present (a batch with no targets gives a zero that still backpropagates)."""
        mod = self.target_modality(dec_pos, dec_valid, dec_ids)
        sums, counts = [], []
        for m in range(len(self.modalities)):
            sel = mod == m
            if self.config.head == "full":    # one softmax over every row of the head
                with torch.autocast(device_type=h.device.type, enabled=False):
                    logits = h[sel].float() @ self.lm_head.weight.float().t()
                target = dec_ids[sel] + self.row_offset[m]
            else:
                logits, target = self.modality_logits(h[sel], m), dec_ids[sel]
            sums.append(F.cross_entropy(logits, target, reduction="sum"))
            counts.append(sel.sum().float())
        return mean_over_modalities(torch.stack(sums), torch.stack(counts))

    def forward(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid, dec_ids=None, dec_counts=None):
        h = self.decode_hidden(enc_ids, enc_pos, enc_valid, dec_pos, dec_valid)
        if dec_ids is None:
            return h
        if self.fast:   # the same loss through hand-written autograd (fastpath.py)
            import fastpath
            return fastpath.loss(self, h, dec_pos, dec_ids, dec_valid, dec_counts)
        return self.loss(h, dec_pos, dec_ids, dec_valid)

    def compile_trunk(self, **kwargs):
        """torch.compile the static-shape trunk (and fastpath's static head); state_dict keys unchanged."""
        self.decode_hidden = torch.compile(self.decode_hidden, **kwargs)
        if self.static_head:
            import fastpath
            self.compiled_static_head = torch.compile(fastpath.static_shape_loss, **kwargs)
        return self

    # -----------------------------------------------------------------------------------------------
    # training helpers (nanoGPT-style)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, block_lr_scale=1.0):
        """AdamW, weight decay on >= 2-D weights only. block_lr_scale != 1 (ToyZoo's): the blocks' lr relative to
        the rest (adapters.lr_parts), each group's 'lr_scale', which train.py applies to the schedule."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if block_lr_scale == 1.0:
            parts = {1.0: [p for _, p in params]}
        else:
            import adapters
            parts = adapters.lr_parts(params, block_lr_scale)
        groups = []
        for scale, ps in parts.items():
            for matrices in (True, False):
                group = [p for p in ps if (p.dim() >= 2) == matrices]
                if group:
                    groups.append({"params": group, "weight_decay": weight_decay if matrices else 0.0,
                                   "lr": learning_rate * scale, "lr_scale": scale})
        # fused: one kernel on CUDA; one vectorised pass on a CPU (torch >= 2.4), ~5x faster there
        use_fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if use_fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def mean_over_modalities(sums, counts):
    """(mean over present modalities of each one's mean CE, {name: (sum_ce, count)}) from [n_mod] sums, counts."""
    present = counts > 0
    loss = (sums / counts.clamp_min(1)).sum() / present.sum().clamp_min(1)
    return loss, {name: (sums[m].detach(), counts[m]) for m, name in enumerate(MODALITY_NAMES)}


def sincos_table(n, dim):
    """[n, dim] fixed 1-D sin-cos positions (Vaswani et al. 2017): sin half, then cos half."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freq[None]
    table = torch.cat([angle.sin(), angle.cos()], dim=1)
    return torch.nn.functional.pad(table, (0, dim - 2 * half)).float()


def read_checkpoint(path, device="cpu", trust=False):
    """-> the checkpoint dict, checked; weights_only unless trust (files.load_torch_file)."""
    import os
    from files import load_torch_file
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no checkpoint there (train.py writes out_dir/ckpt.pt)")
    checkpoint = load_torch_file(path, map_location=device, trust=trust)
    for key in ("model", "model_args"):
        if key not in checkpoint:
            raise ValueError(f"{path}: not a nano4M checkpoint (no {key!r} entry)")
    if set(checkpoint["model_args"]) - {f.name for f in fields(Nano4MConfig)}:   # written before adapters.py
        import adapters
        checkpoint = adapters.upgrade_checkpoint(checkpoint)
    return checkpoint


def checkpoint_weights(checkpoint):
    """The state dict a checkpoint holds, under the plain module's names (torch.compile and DDP prefix them)."""
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in checkpoint["model"].items()}


def model_from_checkpoint(checkpoint):
    """The model a checkpoint dict holds, its weights loaded."""
    model = Nano4M(Nano4MConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint_weights(checkpoint))
    return model


WARM_START_OWN = ("dropout", "mimetic_cross", "cross_local")   # no weights (or only their init): the new run's


def warm_start(model, checkpoint):
    """Load another run's weights into `model`, a new run's (train.py --init_from=<ckpt.pt>: a curriculum). The
    settings that shape or use the weights must agree: a config that says otherwise is a mistake, not an override."""
    mine, theirs = asdict(model.config), asdict(Nano4MConfig(**checkpoint["model_args"]))
    if mine["adapters"] or theirs["adapters"]:   # their init and factored head hold no weights
        import adapters
        mine["adapters"], theirs["adapters"] = adapters.shapes(mine["adapters"]), adapters.shapes(theirs["adapters"])
    differ = [f"{k}: this run {v!r}, checkpoint {theirs[k]!r}" for k, v in mine.items()
              if k not in WARM_START_OWN and theirs[k] != v]
    if differ:
        raise ValueError("its model differs from this run's settings: " + ", ".join(differ))
    try:
        model.load_state_dict(checkpoint_weights(checkpoint))
    except RuntimeError as e:   # e.g. another audio layout, or code features of another width: torch names them
        raise ValueError(f"its weights do not fit this run's model: {' '.join(str(e).split())}") from None


def load_checkpoint(path, device="cpu", trust=False):
    """-> (model in eval mode on device, checkpoint dict). For sample.py / evaluate.py."""
    checkpoint = read_checkpoint(path, device, trust)
    # the audio layout it was trained on (train.py records it; older checkpoints are all EnCodec-shaped)
    M.set_audio_layout(M.AudioLayout(**checkpoint.get("audio_layout", {})))
    model = model_from_checkpoint(checkpoint)
    model.to(device).eval()
    return model, checkpoint
