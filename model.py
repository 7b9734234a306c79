"""
The nano4M encoder-decoder, in one file.

Inputs are (id, global position) pairs chosen by masking.py; targets are global positions whose ids the
decoder must predict. Every token embedding is token + modality + position, where the modality and the
per-modality position (image row/col, audio frame/codebook, caption index) both follow from the global
position (see modalities.py). The encoder runs over the inputs; decoder queries are a learned mask token
plus modality and position embeddings, they attend to each other (within their own modality, as in 4M) and
cross-attend to the encoder output.

The loss is length-normalized per modality: each modality's cross-entropy is averaged over its own scored
targets (a target whose id is modalities.IGNORE_ID, the caption's trailing padding, is a query only),
then the modalities present in the batch are averaged with equal weight, so the 512-token audio stream does
not drown the ~5-token caption. With head='modality' (the default) each modality's logits only span its own
id range; head='full' is the report's one softmax over all 50,304 ids. Either way in float32 (bf16 softmax
over a 50k vocabulary produced NaNs in the report).

    model = Nano4M(Nano4MConfig())
    loss, per_modality = model(enc_ids, enc_pos, enc_valid, dec_pos, dec_valid, dec_ids)
"""
import inspect
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F

import modalities as M
import packing
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
    # False: the report's one table of vocab_size rows, shared by every modality (rgb id 5, depth id 5, audio
    # id 5 and BPE id 5 all read and predict row 5, told apart only by the modality embedding). True: each
    # modality gets rows of its own, as 4M's per-modality input and output adapters do (sum of the five
    # vocabularies, 85,120 rows: more parameters, the same compute per token)
    separate_vocab: bool = False
    # code features: one int per modality (order of MODALITIES; () = none). Where > 0, that modality's token
    # embedding also reads a fixed vector per id from its tokenizer (the patch an image id decodes to, the
    # codebook vector of an audio id) through a learnt linear map, so that ids which look or sound alike start
    # alike. A row per id alone has to learn each of rgb's 16,384 ids from the ~100 times it is seen.
    # Set by train.py --code_features, which fills the vectors (set_code_features); they are saved as buffers.
    code_feature_dims: tuple = ()
    # modality names (e.g. ('tok_rgb',)) whose input tokens read their code features alone, with no learnt row
    # per id: an id then enters as what it stands for (the patch it decodes to), the way a ViT embeds pixels,
    # and cannot be memorised as an id. Their targets still come from the head's own rows. Needs their
    # code_feature_dims > 0.
    feature_only: tuple = ()
    # True: before the encoder, each image grid's input embeddings pass through a small CNN of their own (two
    # 3x3 convolutions, added back residually) over the 14x14 grid, masked positions read as zeros: the
    # locality prior a ViT lacks (trained on the class alone, a 2-layer transformer reads it from ToyZoo's rgb
    # code features 40.6% of the time, a 3-layer CNN 56.9%). Off here (the report's model); the two-stage
    # ToyZoo default turns it on (config/toyzoo.py; alone, in a one-stage run, it did not lift rgb -> class:
    # 26.4% vs 32.7%, docs/experiments.md).
    grid_conv: bool = False
    # 'gpt2': every Linear and Embedding N(0, 0.02), the residual projections 0.02 / sqrt(2 * layers) (nanoGPT).
    # 'torch': the Linears keep PyTorch's own init (uniform +-1/sqrt(fan_in): std 0.05 at width 128, 2.5x
    # gpt2's, and the residual projections 8x), the Embeddings N(0, 0.02) as before. GPT-2's init is made for
    # deep wide stacks: a d2-2w128 model fit to rgb -> caption alone read 30.7% of ToyZoo's test pictures with
    # it and 49.5% with 'torch'. 'gpt2' here (the report's model); the two-stage ToyZoo default uses 'torch'
    # (config/toyzoo.py; in a one-stage multitask run it did not lift rgb -> class, docs/experiments.md)
    init: str = 'gpt2'
    # 'modality': each modality's targets are scored by a softmax over its own id range only (an audio target
    # competes with 2,048 ids, a caption target with 50,304), the head nano4M-Audio trains by default.
    # 'full': the report's head, one softmax over all vocab_size ids for every target (FullVocabCE): an audio
    # target also competes with every rgb, depth and BPE id, so its CE is the report's quantity.
    head: str = 'modality'
    # 'learned': factorised learned positions (image row + col, audio frame + codebook, caption index).
    # 'sincos': the report's code, one fixed 1-D sin-cos table over the flat global position (0 .. 1,115),
    # the same table for every modality (the modality embedding tells them apart)
    pos_emb: str = 'learned'


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1 and we keep it explicit)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


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

    def forward(self, x, attn_mask, context=None):
        B, T, C = x.shape
        if self.cross:
            q = self.q(x)
            k, v = self.kv(context).split(self.n_embd, dim=2)
        else:
            q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        heads = lambda t: t.view(B, t.size(1), self.n_head, C // self.n_head).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(attn_mask, packing.Segments):   # packed: each segment attends within itself
            y = attn_mask.attend(heads(q), heads(k), heads(v), dropout_p)
        else:
            y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask, dropout_p=dropout_p)
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
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = Attention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.self_attn = Attention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.cross_attn = Attention(config, cross=True)
        self.ln_3 = LayerNorm(config.n_embd, config.bias)
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
        TOTAL_POSITIONS, POS_OFFSETS = M.TOTAL_POSITIONS, M.POS_OFFSETS
        # modality m's ids read (and its logits come from) rows [row_offset[m], row_offset[m] + vocab_m)
        vocabs = [m.vocab for m in MODALITIES]
        if config.separate_vocab:
            self.row_offset = [sum(vocabs[:i]) for i in range(len(vocabs))]
            rows = sum(vocabs)
        else:
            self.row_offset = [0] * len(vocabs)
            rows = config.vocab_size
        self.wte = nn.Embedding(rows, D)                         # token embedding (see separate_vocab)
        self.wme = nn.Embedding(len(MODALITIES), D)             # which modality a token belongs to
        if config.pos_emb not in ("learned", "sincos"):
            raise ValueError(f"pos_emb={config.pos_emb!r}: expected 'learned' or 'sincos'")
        if config.head not in ("modality", "full"):
            raise ValueError(f"head={config.head!r}: expected 'modality' or 'full'")
        learned = []
        if config.pos_emb == "learned":
            # position parts; the three image grids share row/col (they are pixel-aligned views of one frame)
            self.pos_row = nn.Parameter(torch.zeros(GRID, D))
            self.pos_col = nn.Parameter(torch.zeros(GRID, D))
            self.pos_frame = nn.Parameter(torch.zeros(M.AUDIO_FRAMES, D))        # stream index i -> frame i // K
            self.pos_codebook = nn.Parameter(torch.zeros(M.AUDIO_CODEBOOKS, D))  # ... and codebook i % K
            seq_lengths = {m.length for m in MODALITIES if m.layout == "seq"}
            self.pos_seq = nn.Parameter(torch.zeros(max(seq_lengths), D))      # caption index
            learned = [self.pos_row, self.pos_col, self.pos_frame, self.pos_codebook, self.pos_seq]
        else:   # fixed, so not saved: it follows from the width
            self.register_buffer("pos_sincos", sincos_table(TOTAL_POSITIONS, D), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(D))                      # the decoder query content
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList([EncoderBlock(config) for _ in range(config.n_enc_layer)])
        self.enc_ln_f = LayerNorm(D, config.bias)
        self.decoder = nn.ModuleList([DecoderBlock(config) for _ in range(config.n_dec_layer)])
        self.dec_ln_f = LayerNorm(D, config.bias)
        self.lm_head = nn.Linear(D, rows, bias=False)           # untied; the same rows per modality as wte
        self.register_buffer("pos_modality", position_modality(torch.arange(TOTAL_POSITIONS)), persistent=False)
        # the row offset of each global position's modality (all zero with the shared table, and unused)
        self.register_buffer("pos_row_offset", torch.tensor(self.row_offset)[self.pos_modality], persistent=False)
        # code features: each featured modality's vectors [vocab_m, F_m] (a buffer, saved with the model) and
        # its map to the width; in code_embedding's table modality m starts at code_offset[m], and every
        # unfeatured modality reads the table's last row, a zero
        dims = tuple(config.code_feature_dims) or (0,) * len(MODALITIES)
        if len(dims) != len(MODALITIES):
            raise ValueError(f"code_feature_dims needs one entry per modality ({len(MODALITIES)}), got {dims}")
        self.code_proj = nn.ModuleDict()
        code_offset, start = [], 0
        for m, f in zip(MODALITIES, dims):
            if f:
                self.register_buffer(f"code_feat_{m.name}", torch.zeros(m.vocab, f))
                self.code_proj[m.name] = nn.Linear(f, D, bias=False)
                code_offset.append(start)
                start += m.vocab
            else:
                code_offset.append(-1)
        self.code_zero_row = start
        self.register_buffer("pos_code_offset", torch.tensor(code_offset)[self.pos_modality], persistent=False)
        for name in config.feature_only:
            if name not in MODALITY_NAMES or not dims[MODALITY_NAMES.index(name)]:
                raise ValueError(f"feature_only={tuple(config.feature_only)}: {name!r} is not a modality with code "
                                 f"features (featured: {[m.name for m, f in zip(MODALITIES, dims) if f]})")
        # whether each global position's input reads its learnt id row (False for the feature_only modalities)
        reads_row = torch.tensor([m.name not in config.feature_only for m in MODALITIES])
        self.register_buffer("pos_reads_id_row", reads_row[self.pos_modality], persistent=False)
        # grid_conv: one small CNN per image modality, and each global position's slot in the stacked grids
        # (k * 196 + cell for the k-th image modality; the spare last slot for every other position)
        grids = [(i, m) for i, m in enumerate(MODALITIES) if m.layout == "grid"]
        self.grid_conv = nn.ModuleDict({m.name: nn.Sequential(
            nn.Conv2d(D, D, 3, padding=1, bias=config.bias), nn.GELU(),
            nn.Conv2d(D, D, 3, padding=1, bias=config.bias)) for _, m in grids} if config.grid_conv else {})
        slot = torch.full((TOTAL_POSITIONS,), len(grids) * GRID * GRID)
        for k, (i, m) in enumerate(grids):
            slot[POS_OFFSETS[i]:POS_OFFSETS[i] + m.length] = k * GRID * GRID + torch.arange(m.length)
        self.register_buffer("pos_grid_slot", slot, persistent=False)
        # how a step is computed, not what it computes (not saved; train.py / bench.py set them): packed = the
        # trunk runs on the real tokens only (packing.py); static_head = the loss in static shapes with no
        # host sync (static_shape_loss), so a whole step can be one CUDA graph. Both give the same numbers.
        self.packed = False
        self.static_head = False
        # static_shape_loss's tables: each modality's vocabulary and first head row, then those of the rows
        # that are not scored (padding, ignored caption slots): one row, 0
        self.register_buffer("head_vocab", torch.tensor([m.vocab for m in MODALITIES] + [1]), persistent=False)
        self.register_buffer("head_start", torch.tensor(self.row_offset + [0]), persistent=False)

        if config.init not in ("gpt2", "torch"):
            raise ValueError(f"init={config.init!r}: expected 'gpt2' or 'torch'")
        self.apply(self._init_weights)
        for p in learned + [self.mask_token]:
            nn.init.normal_(p, mean=0.0, std=0.02)
        # GPT-2's scaled init of the projections that write into the residual stream
        n_resid = 2 * config.n_enc_layer + 3 * config.n_dec_layer
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and config.init == "gpt2":
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_resid))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and self.config.init == "gpt2":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def set_code_features(self, features):
        """features: {modality name: [n <= vocab_m, F_m] tensor} (modality_tokenizers.code_features). Each is
        standardised per dimension over its non-zero rows (an all-zero row marks an unused id and stays zero)
        and scaled by 1/sqrt(F_m), so a row has norm ~1 and the 0.02-init map starts at the embeddings' scale."""
        for name in self.code_proj:
            if features.get(name) is None:
                raise ValueError(f"the model has code features for {name} but none were given")
            f = features[name].float().cpu()
            buf = getattr(self, f"code_feat_{name}")
            if f.dim() != 2 or f.shape[0] > buf.shape[0] or f.shape[1] != buf.shape[1]:
                raise ValueError(f"code features of {name}: shape {tuple(f.shape)}, expected [<= {buf.shape[0]}, "
                                 f"{buf.shape[1]}]")
            used = f.abs().sum(1) > 0
            mu, sd = f[used].mean(0), f[used].std(0).clamp_min(1e-6)
            f = torch.where(used[:, None], (f - mu) / sd / math.sqrt(f.shape[1]), 0.0)
            buf.zero_()
            buf[:f.shape[0]] = f.to(buf.device)

    def code_embedding(self, ids, pos):
        """The code-feature part of the input embeddings of (id, global position) pairs: [..., D]. The table
        maps every id of the featured modalities (rgb: 16,384 x 192 -> D) once per call, shared by all tokens."""
        table = [self.code_proj[name](getattr(self, f"code_feat_{name}")) for name in self.code_proj]
        table = torch.cat(table + [table[0].new_zeros(1, table[0].shape[1])])
        offset = self.pos_code_offset[pos]
        return F.embedding(torch.where(offset >= 0, ids + offset, self.code_zero_row), table)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    # -----------------------------------------------------------------------------------------------
    # the trunk: static shapes, no host syncs, so torch.compile can take it whole

    def position_table(self):
        """[TOTAL_POSITIONS, D]: each modality's position embedding, concatenated in global-position order."""
        if self.config.pos_emb == "sincos":
            return self.pos_sincos
        D = self.config.n_embd
        grid = (self.pos_row[:, None, :] + self.pos_col[None, :, :]).reshape(GRID * GRID, D)
        audio = (self.pos_frame[:, None, :] + self.pos_codebook[None, :, :]).reshape(-1, D)
        parts = {"grid": grid, "audio": audio}
        return torch.cat([parts[m.layout] if m.layout in parts else self.pos_seq[:m.length]
                          for m in self.modalities])

    def grid_features(self, content, enc_pos, enc_valid):
        """grid_conv: each valid image input's content embedding [B, Ni, D] scattered onto its modality's 14x14
        grid (zeros where no input sits), through that modality's CNN, read back at the same cells; zero for
        every other token. Static shapes: padding and non-image tokens all go to one spare slot."""
        B, _, D = content.shape
        cells = GRID * GRID
        spare = len(self.grid_conv) * cells
        slot = torch.where(enc_valid, self.pos_grid_slot[enc_pos], spare)[..., None].expand(-1, -1, D)
        grid = content.new_zeros(B, spare + 1, D).scatter_add(1, slot, content)
        out = []
        for k, conv in enumerate(self.grid_conv.values()):
            g = grid[:, k * cells:(k + 1) * cells].transpose(1, 2).reshape(B, D, GRID, GRID)
            if content.device.type == "cpu" and not torch.compiler.is_compiling():
                # on a CPU, convolve only the samples with an input on this grid: no other sample's cells are
                # read back, and a whole-audio batch has none at all. At ToyZoo's width the convolutions are
                # a large part of a step. (Not on the GPU: finding those samples is a host sync.)
                has = ((slot[:, :, 0] >= k * cells) & (slot[:, :, 0] < (k + 1) * cells)).any(1).nonzero()[:, 0]
                if len(has) < B:   # (even with none, the CNN stays in the graph: DDP expects every grad)
                    y = g.new_zeros(B, D, GRID, GRID).index_copy(0, has, conv(g[has]))
                    out.append(y.flatten(2).transpose(1, 2))
                    continue
            out.append(conv(g).flatten(2).transpose(1, 2))
        return torch.cat(out + [content.new_zeros(B, 1, D)], dim=1).gather(1, slot)

    def embed(self, enc_ids, enc_pos, enc_valid, dec_pos):
        """-> (encoder input embeddings [B, Ni, D], decoder query embeddings [B, No, D])."""
        # modality + position embedding of every global position, summed once over the 1,316 positions, so
        # each token takes one gather rather than two (the modality follows from the position anyway)
        pos_table = self.position_table() + self.wme(self.pos_modality)
        content = self.wte(enc_ids + self.pos_row_offset[enc_pos] if self.config.separate_vocab else enc_ids)
        if self.config.feature_only:
            content = content.masked_fill(~self.pos_reads_id_row[enc_pos][..., None], 0.0)
        if len(self.code_proj):
            content = content + self.code_embedding(enc_ids, enc_pos)
        if len(self.grid_conv):
            content = content + self.grid_features(content, enc_pos, enc_valid)
        x = self.drop(pos_table[enc_pos] + content)
        y = self.drop(self.mask_token + pos_table[dec_pos])
        return x, y

    def decode_hidden(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid):
        """-> decoder output [B, No, D] (after the final LayerNorm), one row per target position."""
        if self.packed and packing.can_pack(enc_valid, dec_valid):   # the same numbers on real tokens only
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
        # cross-attention keys: the valid inputs; a sample with none (masking forbids it, but a direct
        # caller may not) falls back to key 0 so its rows stay finite
        first = torch.arange(Ni, device=device) == 0
        cross_mask = enc_valid | (first & ~enc_valid.any(dim=1, keepdim=True))
        cross_mask = cross_mask[:, None, None, :]                                 # [B, 1, 1, Ni]
        for block in self.decoder:
            y = block(y, memory, dec_mask, cross_mask)
        return self.dec_ln_f(y)

    # -----------------------------------------------------------------------------------------------
    # the head: per-modality logits over the modality's own ids, in float32

    def modality_logits(self, h, m):
        """h [..., D] decoder rows of modality index m -> float32 logits [..., vocab_m]."""
        start = self.row_offset[m]
        with torch.autocast(device_type=h.device.type, enabled=False):
            return h.float() @ self.lm_head.weight[start:start + self.modalities[m].vocab].float().t()

    def target_counts(self, dec_pos, dec_valid, dec_ids):
        """-> HostCounts: each modality's number of scored targets (and the rest's, last), copied to the
        host without waiting. train.py calls this when it makes a batch, long before the step's head needs
        the numbers, so the step never stalls the GPU queue to read them."""
        return HostCounts(torch.bincount(self.target_modality(dec_pos, dec_valid, dec_ids).reshape(-1),
                                         minlength=len(self.modalities) + 1))

    def target_modality(self, dec_pos, dec_valid, dec_ids=None):
        """Modality index of every target slot; len(MODALITY_NAMES) for the padding slots and for the queried
        but unscored ones (dec_ids == IGNORE_ID, the caption's trailing padding)."""
        scored = dec_valid if dec_ids is None else dec_valid & (dec_ids >= 0)
        return torch.where(scored, self.pos_modality[dec_pos], len(self.modalities))

    def per_modality_loss(self, h, dec_pos, dec_ids, dec_valid, dec_counts=None):
        """-> (loss, {name: (sum_ce, count)}). Sorts the valid target rows by modality so each modality's
        logits are one matmul over its own id range. The row counts must be known on the host: from
        dec_counts (see target_counts) if given, else read here, which waits for the whole forward pass."""
        D = h.size(-1)
        h = h.reshape(-1, D)
        ids = dec_ids.reshape(-1)
        mod = self.target_modality(dec_pos, dec_valid, dec_ids).reshape(-1)
        order = torch.argsort(mod, stable=True)
        counts_t = torch.bincount(mod, minlength=len(self.modalities) + 1)
        counts = dec_counts.tolist() if dec_counts is not None else counts_t.tolist()
        rows = [(start, m.vocab) for start, m in zip(self.row_offset, self.modalities)]
        sums = PerModalityCE.apply(h[order], self.lm_head.weight, ids[order], counts[:len(self.modalities)], rows)
        per_modality, means = {}, []
        for m, name in enumerate(MODALITY_NAMES):
            per_modality[name] = (sums[m].detach(), counts_t[m].float())
            if counts[m]:
                means.append(sums[m] / counts[m])
        # no targets at all: a zero that still reaches the graph, so backward() and DDP stay happy
        loss = torch.stack(means).mean() if means else h.float().sum() * 0.0
        return loss, per_modality

    def full_vocab_loss(self, h, dec_pos, dec_ids, dec_valid):
        """head='full', the report's head: -> (loss, {name: (sum_ce, count)}) like per_modality_loss, but every
        target is scored by one softmax over all the head's rows (FullVocabCE). Still length-normalised per
        modality (the report's loss), with static shapes and no host sync."""
        mod = self.target_modality(dec_pos, dec_valid, dec_ids).reshape(-1)
        rows = dec_ids.reshape(-1).clamp_min(0) + self.pos_row_offset[dec_pos].reshape(-1)
        ce = FullVocabCE.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight, rows, mod < len(self.modalities))
        n = len(self.modalities)
        sums = torch.zeros(n + 1, dtype=torch.float32, device=h.device).index_add(0, mod, ce)
        counts = torch.bincount(mod, minlength=n + 1)[:n].float()
        present = counts > 0
        means = sums[:n] / counts.clamp_min(1.0)
        loss = (means * present).sum() / present.sum().clamp_min(1.0)
        return loss, {name: (sums[m].detach(), counts[m]) for m, name in enumerate(MODALITY_NAMES)}

    def static_shape_loss(self, h, dec_pos, dec_ids, dec_valid):
        """per_modality_loss's numbers in static shapes with no host sync (model.static_head), so that
        torch.compile / CUDA graphs can take the head with the trunk. Instead of one matmul per modality at
        its row count (known only on the host), every target row gets logits over one fixed column range, the
        span of every modality's ids but the widest's (the caption's 50,304: with the shared table rows
        0..16,383), with the columns outside its own modality's ids masked out; the widest modality's rows,
        at most B * its length of them, get the rest of its range in a second fixed-size matmul. Costs more
        FLOPs than the per-modality head (every row over 16k columns): the price of static shapes."""
        B, No, D = h.shape
        MODALITIES = self.modalities
        n_mod = len(MODALITIES)
        device = h.device
        mod = self.target_modality(dec_pos, dec_valid, dec_ids).reshape(-1)        # n_mod = not scored
        scored = mod < n_mod
        ids = dec_ids.reshape(-1)
        # each row's id range [lo, hi) in the head; a row that is not scored gets [0, 1) (finite, then zeroed)
        # rather than none, whose NaN gradient would leak (buffers: a tensor made here would be a copy)
        lo, hi = self.head_start[mod], (self.head_start + self.head_vocab)[mod]
        wide = max(range(n_mod), key=lambda m: MODALITIES[m].vocab)
        others = [m for m in range(n_mod) if m != wide]
        c0, c1 = min(self.row_offset[m] for m in others), max(self.row_offset[m] + MODALITIES[m].vocab for m in others)
        with torch.autocast(device_type=device.type, enabled=False):
            hf, weight = h.reshape(-1, D).float(), self.lm_head.weight.float()
            cols = torch.arange(c0, c1, device=device)
            # masked columns: a large finite negative, not -inf, so a row with none of its ids in this range
            # (the widest modality's, with separate_vocab) gets a zero gradient here rather than NaN
            logits = (hf @ weight[c0:c1].t()).masked_fill((cols < lo[:, None]) | (cols >= hi[:, None]), -1e30)
            lse = torch.logsumexp(logits, dim=1)
            # the widest modality's rows come first in this order; its columns outside [c0, c1) for them
            w0, w1 = self.row_offset[wide], self.row_offset[wide] + MODALITIES[wide].vocab
            cap = B * min(No, MODALITIES[wide].length)
            rows = torch.argsort((mod != wide).to(torch.uint8), stable=True)[:cap]
            spans = [(a, b) for a, b in ((w0, min(w1, c0)), (max(w0, c1), w1)) if b > a]
            tail = torch.logsumexp(torch.cat([hf[rows] @ weight[a:b].t() for a, b in spans], 1), dim=1)
            tail = torch.where(mod[rows] == wide, tail, float("-inf"))
            lse = lse.index_put((rows,), torch.logaddexp(lse[rows], tail))
            target = torch.where(scored, lo + ids.clamp_min(0), 0)
            ce = torch.where(scored, lse - (hf * weight[target]).sum(1), 0.0)
        sums = ce.new_zeros(n_mod + 1).index_add(0, mod, ce)[:n_mod]
        counts = ce.new_zeros(n_mod + 1).index_add(0, mod, torch.ones_like(ce))[:n_mod]
        present = counts > 0
        # the mean over the modalities present of each one's mean CE; no targets at all gives a zero in the graph
        loss = (sums / counts.clamp_min(1)).sum() / present.sum().clamp_min(1)
        per_modality = {name: (sums[m].detach(), counts[m]) for m, name in enumerate(MODALITY_NAMES)}
        return loss, per_modality

    def forward(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid, dec_ids=None, dec_counts=None):
        h = self.decode_hidden(enc_ids, enc_pos, enc_valid, dec_pos, dec_valid)
        if dec_ids is None:
            return h
        if self.config.head == "full":
            return self.full_vocab_loss(h, dec_pos, dec_ids, dec_valid)
        if self.static_head:
            return self.static_shape_loss(h, dec_pos, dec_ids, dec_valid)
        return self.per_modality_loss(h, dec_pos, dec_ids, dec_valid, dec_counts)

    def compile_trunk(self, **kwargs):
        """torch.compile the static-shape trunk only; the per-modality head's row counts vary per batch
        (with static_head, that head is compiled too). The state_dict keys stay unchanged."""
        self.decode_hidden = torch.compile(self.decode_hidden, **kwargs)
        self.static_shape_loss = torch.compile(self.static_shape_loss, **kwargs)
        return self

    # -----------------------------------------------------------------------------------------------
    # training helpers (nanoGPT-style)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, block_lr_scale=1.0):
        """AdamW; weight decay on matrices and embeddings (>= 2-D), none on norms, biases, vectors.
        block_lr_scale: the learning rate of the encoder/decoder blocks (and of grid_conv's CNNs) relative to
        the rest (token, modality and position embeddings, mask token, head). Every group carries its
        'lr_scale'; train.py multiplies the scheduled lr by it. Below 1 helps a small, fast-trained model: at
        a high lr Adam's first noisy steps move the small-init block weights far enough to swamp which token
        is which, while the embeddings still need the high lr (measured on ToyZoo: audio -> class 80% vs 18% after 150 steps,
        d2-2w128, lr 2e-3, block_lr_scale 0.25 vs 1)."""
        in_block = lambda name: name.startswith(("encoder.", "decoder.", "grid_conv."))
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if block_lr_scale == 1.0:
            parts = [(1.0, [p for _, p in named])]
        else:
            parts = [(1.0, [p for n, p in named if not in_block(n)]),
                     (block_lr_scale, [p for n, p in named if in_block(n)])]
        groups = []
        for scale, params in parts:
            for matrices in (True, False):
                ps = [p for p in params if (p.dim() >= 2) == matrices]
                if ps:
                    groups.append({"params": ps, "weight_decay": weight_decay if matrices else 0.0,
                                   "lr": learning_rate * scale, "lr_scale": scale})
        # fused AdamW: one kernel over all parameters on CUDA; on a CPU (torch >= 2.4) one vectorised pass
        # instead of a dozen, ~5x faster there, where the small ToyZoo model's 22M embedding and head weights
        # make the optimizer step a large part of the step
        use_fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if use_fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_step(self, batch_size, n_in, n_out):
        """Training FLOPs (forward + backward = 3x forward, 2 per multiply-add) of one step with n_in input
        and n_out target slots per sample. Counts the padded slots (they are computed), attention scores,
        and the head at the mean vocabulary of the five modalities (targets split evenly on average), and the
        grid_conv CNNs where they are on."""
        D, Le, Ld = self.config.n_embd, self.config.n_enc_layer, self.config.n_dec_layer
        enc = n_in * Le * (12 * D * D + 4 * n_in * D)
        dec = Ld * (n_out * (14 * D * D + 4 * n_out * D + 4 * n_in * D) + n_in * 2 * D * D)
        mean_vocab = sum(m.vocab for m in self.modalities) / len(self.modalities)
        if self.config.head == "full":
            mean_vocab = self.lm_head.weight.shape[0]       # every target against every row
        head = n_out * D * mean_vocab
        # grid_conv: two 3x3 convolutions over every cell of each image grid, whatever the inputs
        stem = len(self.grid_conv) * GRID * GRID * 2 * 9 * D * D
        return 3 * 2 * batch_size * (enc + dec + head + stem)

    def estimate_mfu(self, batch_size, n_in, n_out, dt, peak_flops=989e12):
        """Model FLOPs utilization of a step that took dt seconds. peak_flops: the accelerator's dense peak
        for the dtype used (H100 SXM bf16 989e12; for fp32 via TF32 pass ~494e12)."""
        return self.flops_per_step(batch_size, n_in, n_out) / dt / peak_flops


class PerModalityCE(torch.autograd.Function):
    """Summed cross-entropy of each modality's rows (h and ids sorted by modality, counts rows each) over its
    own id range, the head rows weight[start:start + vocab] (rows: one (start, vocab) per modality), in float32:
    the numbers of F.cross_entropy(h_m @ weight[start:start + vocab].T, ids_m,
    reduction="sum"), with less memory traffic over the [rows, vocab] logits, the largest tensors of a step:
    - forward: one log_softmax pass over each modality's logits (logsumexp costs several), kept for backward;
    - backward: the log-probabilities turn into the softmax in place (one pass), the one-hot is subtracted
      at the target ids, and the upstream gradient scales the small [rows, D] side of each matmul instead of
      the [rows, vocab] matrix; the head's gradient is one buffer, not a zero-padded one per modality.
    Counts may be zero; rows beyond sum(counts) (the padding) get a zero gradient.
    The matmuls stay float32 (TF32 on CUDA): bf16 head matmuls with float32 accumulation measured no faster
    on an H100 (see README, Speed)."""

    @staticmethod
    def forward(ctx, h, weight, ids, counts, rows):
        with torch.autocast(device_type=h.device.type, enabled=False):
            saved, sums = [], []
            sizes = list(counts) + [h.size(0) - sum(counts)]       # the modalities', then the padding rows
            for h_m, ids_m, (start, vocab) in zip(h.split(sizes), ids.split(sizes), rows):
                if h_m.size(0) == 0:
                    saved.append(None)
                    sums.append(h.new_zeros((), dtype=torch.float32))
                    continue
                logp = torch.log_softmax(h_m.float() @ weight[start:start + vocab].float().t(), dim=1)
                sums.append(-logp.gather(1, ids_m[:, None]).sum())
                saved.append(logp)
        ctx.saved, ctx.counts, ctx.rows = saved, list(counts), list(rows)
        ctx.save_for_backward(h, weight, ids)
        return torch.stack(sums)

    @staticmethod
    def backward(ctx, grad_sums):
        h, weight, ids = ctx.saved_tensors
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            start = 0
            for m, n in enumerate(ctx.counts):
                if n == 0:
                    continue
                grad = ctx.saved[m].exp_()                                           # softmax, in place
                ctx.saved[m] = None                                                  # free as we go
                w0, vocab = ctx.rows[m]
                grad[torch.arange(n, device=h.device), ids[start:start + n]] -= 1.0  # minus the one-hot
                w_m, h_m = weight[w0:w0 + vocab].float(), h[start:start + n].float()
                torch.mm(grad, w_m, out=grad_h[start:start + n])
                grad_h[start:start + n] *= grad_sums[m]
                grad_w[w0:w0 + vocab].addmm_(grad.t(), h_m * grad_sums[m])
                start += n
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None, None, None


class FullVocabCE(torch.autograd.Function):
    """head='full': the cross-entropy of each row of h [N, D] over all rows of the head weight [V, D] (one
    softmax over the whole vocabulary, the report's head), in float32; rows where scored is False give 0 and
    no gradient. The numbers of F.cross_entropy(h @ weight.T, ids, reduction='none') * scored, done in row
    chunks so the [N, V] logits (V = 50,304) never exist whole: each chunk's softmax is recomputed in backward
    instead of kept, which costs one more matmul per chunk and saves the largest tensor of the step."""
    CHUNK = 2048

    @staticmethod
    def forward(ctx, h, weight, ids, scored):
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.float()
            out = []
            for s in range(0, h.size(0), FullVocabCE.CHUNK):
                logits = h[s:s + FullVocabCE.CHUNK].float() @ w.t()
                i = ids[s:s + FullVocabCE.CHUNK]
                out.append(torch.logsumexp(logits, dim=1) - logits.gather(1, i[:, None])[:, 0])
            ce = torch.cat(out) * scored if out else h.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(h, weight, ids, scored)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        h, weight, ids, scored = ctx.saved_tensors
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.float()
            g = grad_ce.float() * scored
            for s in range(0, h.size(0), FullVocabCE.CHUNK):
                h_c = h[s:s + FullVocabCE.CHUNK].float()
                grad = torch.softmax(h_c @ w.t(), dim=1)
                grad[torch.arange(grad.size(0), device=h.device), ids[s:s + FullVocabCE.CHUNK]] -= 1.0
                grad *= g[s:s + FullVocabCE.CHUNK, None]
                grad_h[s:s + FullVocabCE.CHUNK] = grad @ w
                grad_w.addmm_(grad.t(), h_c)
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None, None


def sincos_table(n, dim):
    """[n, dim] fixed 1-D sin-cos positions (Vaswani et al. 2017): sin in the first half, cos in the second,
    frequencies 1 / 10000^(2i / dim)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freq[None]
    table = torch.cat([angle.sin(), angle.cos()], dim=1)
    return torch.nn.functional.pad(table, (0, dim - 2 * half)).float()


class HostCounts:
    """A small device tensor copied to the host without blocking. tolist() waits for that copy alone, not
    for the work queued on the GPU after it (a plain .tolist() waits for everything queued so far)."""

    def __init__(self, counts):
        self.host = counts.to("cpu", non_blocking=True)
        self.copied = None
        if counts.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def tolist(self):
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


def load_checkpoint(path, device="cpu", trust=False):
    """-> (model in eval mode on device, checkpoint dict). For sample.py / evaluate.py.
    Loaded with weights_only=True (modalities.load_torch_file); trust=True (--trust_checkpoint=True) only for
    a file of your own that needs pickle."""
    import os
    from modalities import load_torch_file
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no checkpoint there (train.py writes out_dir/ckpt.pt)")
    checkpoint = load_torch_file(path, map_location=device, trust=trust)
    for key in ("model", "model_args"):
        if key not in checkpoint:
            raise ValueError(f"{path}: not a nano4M checkpoint (no {key!r} entry)")
    # the audio layout it was trained on (train.py records it; older checkpoints are all EnCodec-shaped)
    M.set_audio_layout(M.AudioLayout(**checkpoint.get("audio_layout", {})))
    model = Nano4M(Nano4MConfig(**checkpoint["model_args"]))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in checkpoint["model"].items()}
    model.load_state_dict(state)
    model.to(device).eval()
    return model, checkpoint


def config_dict(config):
    return asdict(config)
