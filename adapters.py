"""
ToyZoo's embedding adapters: what config/toyzoo*.py adds to the report's model (model.py), behind one seam
(and the factored head, behind Nano4M.modality_logits and fastpath's per-modality loss).
Nano4M.embed reads a token's content as wte(id) alone, unless model_args['adapters'] is set; then it asks
EmbeddingAdapters.embed_inputs here. None of this is the report's model; each switch was measured on ToyZoo
(docs/experiments.md):

  separate_vocab     each modality gets embedding and head rows of its own (sum of the five vocabularies,
                     85,120 rows), as 4M's per-modality adapters do, not the report's one shared table.
  code_feature_dims  one int per modality (order of MODALITIES); where > 0 that modality's input also reads a
                     fixed vector per id from its tokenizer (the patch an image id decodes to, the codebook
                     vector of an audio id) through a learnt linear map, so ids that look or sound alike start
                     alike. train.py fills the vectors (set_code_features); they are saved as buffers.
  feature_only       modality names whose inputs read their code features alone, no learnt row per id: an
                     id enters as what it stands for, the way a ViT embeds pixels. Targets still use the head.
  grid_conv          before the encoder, each image grid's input embeddings pass through a small CNN of their
                     own (two 3x3 convolutions over the 14x14 grid, masked cells read as zeros): a locality
                     prior the transformer lacks.
  init               'gpt2' (nanoGPT's N(0, 0.02)) or 'torch': the Linears keep PyTorch's own init, which a
                     small, fast-trained model reads pictures better with.
  factored_head      (name, Km, Ks) per modality whose ids are a product code (id = a * Ks + b: the patch
                     k-means tokenizers' mean x shape): its targets are scored by two small softmaxes, over
                     the Km means and the Ks shapes, from the first Km + Ks head rows of its block (no new
                     weights). The logits of an id are a[id // Ks] + b[id % Ks], so p(id) = p(a) p(b): each
                     cell's expected patch (the default read-out) is the same function of the marginals, and
                     the head costs Km + Ks columns a target instead of Km * Ks.

train.py's `adapters` setting is a dict of these (code_features=True in place of the widths, and factored_head
as modality names, both read from the dataset's tokenizers) plus block_lr_scale, the blocks' learning rate
relative to the rest (lr_parts).
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F

import modalities as M


@dataclass
class AdapterConfig:
    separate_vocab: bool = False
    code_feature_dims: tuple = ()
    feature_only: tuple = ()
    grid_conv: bool = False
    init: str = 'gpt2'
    factored_head: tuple = ()


# train.py's `adapters` dict: the model's switches (code_features: read the widths from the dataset) and
# the optimizer's block_lr_scale
TRAIN_KEYS = dict(separate_vocab=False, code_features=False, feature_only=(), grid_conv=False, init='gpt2',
                  block_lr_scale=1.0, factored_head=())   # factored_head: modality names; Km, Ks from the data


# the switches (and their off values) that checkpoints from before this module keep flat in model_args, with
# the adapters' weights at the top level of the state dict
FLAT_KEYS = dict(separate_vocab=False, code_feature_dims=(), feature_only=(), grid_conv=False, init='gpt2')


def fold_flat_keys(model_args):
    """model_args with the flat switches of FLAT_KEYS folded into model_args['adapters'] (the off ones dropped)."""
    flat = {k: model_args[k] for k in FLAT_KEYS if k in model_args and model_args[k] != FLAT_KEYS[k]}
    args = {k: v for k, v in model_args.items() if k not in FLAT_KEYS}
    if flat:
        args['adapters'] = {**flat, **(args.get('adapters') or {})}
    return args


def upgrade_checkpoint(checkpoint):
    """A checkpoint written before adapters.py, in today's layout (model.read_checkpoint calls this)."""
    moved = ("code_proj.", "code_feat_", "grid_conv.")
    state = {("adapters." + k if k.startswith(moved) else k): v for k, v in checkpoint["model"].items()}
    return dict(checkpoint, model=state, model_args=fold_flat_keys(checkpoint["model_args"]))


def resolve(settings, tok_path=None, meta=None, trust=False):
    """train.py's `adapters` setting -> (model_args['adapters'] or None, block_lr_scale, {name: vectors}).
    tok_path None (a dry run): code features are left out, since their widths come from the dataset."""
    if not settings:
        return None, 1.0, {}
    unknown = set(settings) - set(TRAIN_KEYS)
    if unknown:
        raise ValueError(f"adapters: unknown key(s) {sorted(unknown)}; valid: {', '.join(TRAIN_KEYS)}")
    s = {**TRAIN_KEYS, **settings}
    features = {}
    if s['code_features'] and tok_path is not None:
        import modality_tokenizers
        features = modality_tokenizers.code_features(tok_path, meta, trust=trust)
        if not any(features.get(m.name) is not None for m in M.MODALITIES):
            raise ValueError(f"--code_features: no tokenizer of {tok_path} gives a vector per id")
    dims = tuple(0 if features.get(m.name) is None else features[m.name].shape[1] for m in M.MODALITIES)
    model = dict(separate_vocab=s['separate_vocab'], code_feature_dims=dims if any(dims) else (),
                 feature_only=tuple(s['feature_only']) if any(dims) else (), grid_conv=s['grid_conv'],
                 init=s['init'], **weightless(s, tok_path, meta, trust))
    return model, float(s['block_lr_scale']), features


def weightless(settings, tok_path=None, meta=None, trust=False):
    """The model switches of train.py's `adapters` dict that hold no weights, which a warm start takes from this
    run rather than from the checkpoint: factored_head, with each modality's (Km, Ks) read from its tokenizer."""
    names = (settings or {}).get('factored_head') or ()
    if not names:
        return dict(factored_head=())
    if tok_path is None:
        return {}
    import modality_tokenizers
    factors = []
    for name in ((names,) if isinstance(names, str) else names):
        tok = modality_tokenizers.load_tokenizer(tok_path, meta, name, trust=trust)
        if not hasattr(tok, 'factors'):
            raise ValueError(f"factored_head: the {name} ids of {tok_path} are not a product code "
                             f"(tokenizer {type(tok).__name__}; the patch k-means tokenizers' are)")
        factors.append((M.SHORT_NAMES.get(name, name), *tok.factors))
    return dict(factored_head=tuple(factors))


def shapes(settings):
    """The switches of train.py's `adapters` dict or a model's that fix the weights' shapes (not init; the
    code features' widths come with the features): a warm start must agree on them."""
    s = settings or {}
    return dict(separate_vocab=bool(s.get('separate_vocab')), feature_only=tuple(s.get('feature_only', ())),
                grid_conv=bool(s.get('grid_conv')))


def vocab_rows(cfg):
    """-> (rows of the embedding and head, row_offset: modality m's ids read and predict rows
    [row_offset[m], row_offset[m] + vocab_m)): one shared table, or with separate_vocab one block per modality."""
    vocabs = [m.vocab for m in M.MODALITIES]
    if AdapterConfig(**cfg).separate_vocab:
        return sum(vocabs), [sum(vocabs[:i]) for i in range(len(vocabs))]
    return M.VOCAB_SIZE, [0] * len(vocabs)


def lr_parts(named_params, block_lr_scale):
    """{lr scale: parameters}: the blocks (and grid CNNs) at block_lr_scale, the embeddings and head at 1.0
    (Nano4M.configure_optimizers makes the weight-decay groups of each)."""
    in_block = lambda name: name.startswith(("encoder.", "decoder.", "adapters.grid_conv."))
    return {1.0: [p for n, p in named_params if not in_block(n)],
            block_lr_scale: [p for n, p in named_params if in_block(n)]}


class EmbeddingAdapters(nn.Module):
    """The adapters of one model: its token rows per modality, code features, feature-only inputs, grid CNNs."""

    def __init__(self, cfg, n_embd, bias):
        super().__init__()
        cfg = AdapterConfig(**cfg)
        self.cfg, D, MODALITIES = cfg, n_embd, M.MODALITIES
        pos_modality = M.position_modality(torch.arange(M.TOTAL_POSITIONS))
        self.rows, self.row_offset = vocab_rows(asdict(cfg))
        self.register_buffer("pos_row_offset", torch.tensor(self.row_offset)[pos_modality], persistent=False)
        # code features: each featured modality's vectors [vocab_m, F_m] (a buffer, saved with the model) and
        # its map to the width; in code_embedding's table modality m starts at code_offset[m], and every
        # unfeatured modality reads the table's last row, a zero
        dims = tuple(cfg.code_feature_dims) or (0,) * len(MODALITIES)
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
        self.register_buffer("pos_code_offset", torch.tensor(code_offset)[pos_modality], persistent=False)
        for name in cfg.feature_only:
            if name not in M.MODALITY_NAMES or not dims[M.MODALITY_NAMES.index(name)]:
                raise ValueError(f"feature_only={tuple(cfg.feature_only)}: {name!r} is not a modality with code "
                                 f"features (featured: {[m.name for m, f in zip(MODALITIES, dims) if f]})")
        # whether each global position's input reads its learnt id row (False for the feature_only modalities)
        reads_row = torch.tensor([m.name not in cfg.feature_only for m in MODALITIES])
        self.register_buffer("pos_reads_id_row", reads_row[pos_modality], persistent=False)
        self._init_grid_conv(D, bias)
        # factored_head: {modality index: (Km, Ks)}
        self.factors = {M.MODALITY_NAMES.index(name): (int(a), int(b)) for name, a, b in cfg.factored_head}
        for m, (a, b) in self.factors.items():
            if not cfg.separate_vocab or a * b > MODALITIES[m].vocab:
                raise ValueError(f"factored_head: {MODALITIES[m].name} needs separate_vocab and {a} x {b} <= its "
                                 f"vocab {MODALITIES[m].vocab}")
        if cfg.init not in ("gpt2", "torch"):
            raise ValueError(f"init={cfg.init!r}: expected 'gpt2' or 'torch'")

    def _init_grid_conv(self, D, bias):
        # one small CNN per image modality, and each global position's slot in the stacked grids
        # (k * 196 + cell for the k-th image modality; the spare last slot for every other position)
        grids = [(i, m) for i, m in enumerate(M.MODALITIES) if m.layout == "grid"]
        self.grid_conv = nn.ModuleDict({m.name: nn.Sequential(
            nn.Conv2d(D, D, 3, padding=1, bias=bias), nn.GELU(),
            nn.Conv2d(D, D, 3, padding=1, bias=bias)) for _, m in grids} if self.cfg.grid_conv else {})
        GRID = M.GRID
        slot = torch.full((M.TOTAL_POSITIONS,), len(grids) * GRID * GRID)
        for k, (i, m) in enumerate(grids):
            slot[M.POS_OFFSETS[i]:M.POS_OFFSETS[i] + m.length] = k * GRID * GRID + torch.arange(m.length)
        self.register_buffer("pos_grid_slot", slot, persistent=False)

    def embed_inputs(self, wte, ids, pos, valid):
        """The content part of the input embeddings [B, Ni, D] (model.Nano4M.embed adds modality + position)."""
        content = wte(ids + self.pos_row_offset[pos] if self.cfg.separate_vocab else ids)
        if self.cfg.feature_only:
            content = content.masked_fill(~self.pos_reads_id_row[pos][..., None], 0.0)
        if len(self.code_proj):
            content = content + self.code_embedding(ids, pos)
        if len(self.grid_conv):
            content = content + self.grid_features(content, pos, valid)
        return content

    def factored_logits(self, h, weight, m):
        """factored_head: float32 logits [..., vocab_m] of modality m's ids from its head block `weight`: a[id // Ks] +
        b[id % Ks]; ids past Km * Ks (a tokenizer with fewer codes) get a large negative."""
        Km, Ks = self.factors[m]
        with torch.autocast(device_type=h.device.type, enabled=False):
            a, b = (h.float() @ weight[:Km + Ks].float().t()).split([Km, Ks], dim=-1)
        logits = (a[..., :, None] + b[..., None, :]).flatten(-2)
        vocab = M.MODALITIES[m].vocab
        return logits if vocab == Km * Ks else F.pad(logits, (0, vocab - Km * Ks), value=-1e30)

    @torch.no_grad()
    def set_code_features(self, features):
        """features: {modality name: [n <= vocab_m, F_m] tensor} (modality_tokenizers.code_features). Each is
        standardised per dimension over its non-zero rows (an all-zero row marks an unused id and stays zero)
        and scaled by 1/sqrt(F_m), so a row has norm ~1 and the 0.02-init map starts at the embeddings' scale.
        Returns the names whose vectors changed (a warm start on another tokenization of the data)."""
        changed = []
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
            f = torch.cat([f, f.new_zeros(buf.shape[0] - f.shape[0], f.shape[1])]).to(buf.device)
            if not torch.equal(f, buf):
                changed.append(name)
                buf.copy_(f)
        return changed

    def code_embedding(self, ids, pos):
        """The code-feature part of the input embeddings of (id, global position) pairs: [..., D]. The table
        maps every id of the featured modalities (rgb: 16,384 x 192 -> D) once per call, shared by all tokens."""
        table = [self.code_proj[name](getattr(self, f"code_feat_{name}")) for name in self.code_proj]
        table = torch.cat(table + [table[0].new_zeros(1, table[0].shape[1])])
        offset = self.pos_code_offset[pos]
        return F.embedding(torch.where(offset >= 0, ids + offset, self.code_zero_row), table)

    def grid_features(self, content, enc_pos, enc_valid):
        """grid_conv: each valid image input's content embedding [B, Ni, D] scattered onto its modality's 14x14
        grid (zeros where no input sits), through that modality's CNN, read back at the same cells; zero for
        every other token. Static shapes: padding and non-image tokens all go to one spare slot."""
        B, _, D = content.shape
        GRID, cells = M.GRID, M.GRID * M.GRID
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

