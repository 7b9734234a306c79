"""
Train nano4M on a tokenized dataset:

    python train.py config/audio.py --dtype=bfloat16 --compile=True
    torchrun --standalone --nproc_per_node=8 train.py config/audio.py --gradient_accumulation_steps=8

Each step masks batch_size random (clip, view) pairs of the memmapped train split with 4M Dirichlet masking
(masking.py) and minimizes the per-modality-averaged cross-entropy. Settings: a config file or --key=value
(--help lists them; --dry_run=True prints them resolved). Writes out_dir/ckpt.pt (atomically;
--init_from=resume continues the same curve), log.jsonl (eval CE per modality) and train_log.jsonl.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
from torch.distributed import init_process_group, destroy_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
import modalities
from masking import MaskingConfig, build_batch, condition_dropout, trim_padding
from model import Nano4M, Nano4MConfig, model_from_checkpoint, read_checkpoint, warm_start

# -----------------------------------------------------------------------------------------------------
# default config values: the report's recipe (d6-6w512, batch 64, 18,311 steps, AdamW, cosine 1e-4 -> 1e-6)
# I/O
out_dir = 'out'
eval_interval = 500
log_interval = 10
eval_iters = 20                 # batches per split per eval (the same batches every eval: fixed seed)
eval_only = False
always_save_checkpoint = True   # else only when val loss improves
init_from = 'scratch'           # 'scratch', 'resume' (out_dir/ckpt.pt), or another run's ckpt.pt: its weights with
                                # a fresh optimizer and schedule (a curriculum)
trust_checkpoint = False        # True: also load a pickled checkpoint of your own (never someone else's)
# wandb logging
wandb_log = False
wandb_project = 'nano4m-audio'
wandb_run_name = 'run'
wandb_mode = 'offline'          # 'online' to sync; offline works without network
# data
dataset = 'toyzoo'
data_root = 'data'
max_train_clips = 0             # 0 = all; K = a stratified subset of K train clips, nested, fixed by seed
gradient_accumulation_steps = 1 # total over all DDP ranks
batch_size = 64                 # per rank, per micro-step
masking = asdict(MaskingConfig())  # one group, defaults in masking.py: e.g. --masking.input_budget=(8,64)
cond_dropout = 0.1              # share of train samples that keep only their targets' modalities' inputs: guidance's
                                # unconditional half (masking.condition_dropout; the report: 0)
audio_levels = 0.0              # share of train samples that learn one audio codebook level from the ones below it
                                # (levels.py), for sampling level by level (generate's by_level)
augment_shift = 0               # train batches: shift the image grids by up to this many patches
# model
n_enc_layer = 6
n_dec_layer = 6
n_embd = 512
n_head = 8
dropout = 0.0
bias = False
dec_same_modality = True
head = 'modality'               # a softmax over each modality's own ids; 'full': the report's, over all 50,304
pos_emb = 'learned'             # factorised learned positions; 'sincos': the report's fixed 1-D table; 'sincos_layout':
                                # fixed, 2-D on the image grids and 1-D over audio frames (locality.py)
mimetic_cross = 0.0             # > 0: cross-attention starts attending to like keys (locality.py; docs/experiments.md)
cross_local = 0.0               # > 0: half the cross-attention heads pay this per place of distance (locality.py)
adapters = None                 # None = the report's model; a dict: ToyZoo's embedding adapters (adapters.py)
# adamw optimizer
learning_rate = 1e-4
max_iters = 18311
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # clip gradients at this norm; 0.0 disables
# learning rate schedule: linear warmup then cosine to min_lr at lr_decay_iters
decay_lr = True
warmup_iters = 916
lr_decay_iters = 18311
min_lr = 1e-6
# system
device = 'auto'                 # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'float32'               # 'float32' (TF32 matmuls on CUDA), 'bfloat16' (autocast) or 'float16'
compile = False                 # torch.compile the trunk (the static-shape part of the model)
compile_mode = 'default'        # 'reduce-overhead': the trunk as CUDA graphs (fastest on an H200, docs/speed.md)
peak_flops = 989e12             # for MFU: the accelerator's dense peak (H100 SXM bf16)
fast_path = True                # the same loss through fastpath.py (measured faster: bench.py); False: the plain code
packing = 'auto'                # the trunk on real tokens only (packing.py): 'on', 'off', 'auto' = on for eager CPU steps
static_head = False             # (fast path) a static-shape head that --compile can take too (slower on a CPU)
threads = 0                     # CPU threads for torch (0 = torch's default); 1 is best on a busy machine
seed = 1337
dry_run = False                 # True: print the resolved settings and the model's size as JSON, then exit
# -----------------------------------------------------------------------------------------------------
_defaults = configurator.settings(globals())
try:
    _config = configurator.apply_overrides(_defaults, sys.argv[1:])
    configurator.check_choices(_config, {'dtype': ('float32', 'bfloat16', 'float16'), 'compile_mode': (
        'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')})   # torch.compile's modes
except configurator.ConfigError as e:
    raise SystemExit(f"train.py: {e}")
globals().update(_config)
config = dict(_config)          # everything, recorded in the checkpoint and in wandb
# -----------------------------------------------------------------------------------------------------

try:
    mask_cfg = MaskingConfig.from_settings(config)
except (ValueError, TypeError) as e:
    raise SystemExit(f"train.py: bad masking settings: {e}")
for _k in ('cond_dropout', 'audio_levels'):
    if not 0.0 <= config[_k] < 1.0:
        raise SystemExit(f"train.py: --{_k}={config[_k]} must lie in [0, 1)")
config['masking'] = asdict(mask_cfg)   # resolved: what the dry run prints and the checkpoint records
model_args = {f.name: config[f.name] for f in fields(Nano4MConfig) if f.name in config}


def resolve_adapters(tok_path=None, meta=None):
    """model_args['adapters'], block_lr_scale, code feature vectors (adapters.resolve; no data: a dry run)."""
    if not adapters:
        return None, 1.0, {}
    import adapters as adapters_lib
    try:
        return adapters_lib.resolve(adapters, tok_path, meta, trust_checkpoint)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"train.py: {e}")


if dry_run:   # the resolved settings and model (code feature widths come from the data, not read here)
    model_args['adapters'] = resolve_adapters()[0]
    try:
        _n = Nano4M(Nano4MConfig(**model_args)).get_num_params()
    except ValueError as e:
        raise SystemExit(f"train.py: {e}")
    print(f"model: {_n / 1e6:.2f}M parameters" + (" (without code features)" if adapters and adapters.get(
        'code_features') else ""))
    print(json.dumps({**config, 'derived': {
        'n_params': _n, 'audio_span_stride': modalities.AUDIO_CODEBOOKS,
        'lr_schedule': 'linear warmup then cosine' if decay_lr else 'constant',
        'max_input_tokens': mask_cfg.max_input_tokens, 'max_target_tokens': mask_cfg.max_target_tokens,
        'architecture_from': init_from if init_from != 'scratch' else 'these settings'}}, default=str))
    sys.exit(0)

# DDP (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE)
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    ddp_rank = int(os.environ['RANK'])
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if device == 'cpu' or not torch.cuda.is_available():   # CPU DDP (gloo): for trying the code path
        init_process_group(backend='gloo')
        device = 'cpu'
    else:
        init_process_group(backend='nccl')
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0
    seed_offset = ddp_rank
    if gradient_accumulation_steps % ddp_world_size != 0:
        raise SystemExit(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of "
                         f"the world size {ddp_world_size}")
    gradient_accumulation_steps //= ddp_world_size
else:
    ddp_rank, ddp_world_size, master_process, seed_offset = 0, 1, True, 0
    device = modalities.pick_device(device)
device_type = 'cuda' if 'cuda' in device else ('mps' if 'mps' in device else 'cpu')
# CUDA-graph modes: each step and eval batch marks a new iteration, so no graph output is read after a replay
cuda_graphs = compile and device_type == 'cuda' and compile_mode in ('reduce-overhead', 'max-autotune')
if packing.lower() not in ('auto', 'on', 'true', 'off', 'false'):
    raise SystemExit(f"--packing={packing!r}: choose auto, on or off")
use_packing = packing.lower() in ('on', 'true') or (packing.lower() == 'auto' and fast_path and device_type == 'cpu'
                                                    and not compile)
if use_packing and compile:
    raise SystemExit("--packing=on needs eager steps (its shapes change every batch): drop --compile")

tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * (
    mask_cfg.max_input_tokens + mask_cfg.max_target_tokens)
if master_process:
    print(f"tokens per iteration (input + target slots): {tokens_per_iter:,}")
    os.makedirs(out_dir, exist_ok=True)

torch.manual_seed(seed + seed_offset)
if threads:
    torch.set_num_threads(threads)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls (and the fp32 head under bf16) on TF32 cores
    torch.backends.cudnn.allow_tf32 = True
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' or device_type == 'mps' else \
    torch.autocast(device_type=device_type, dtype=ptdtype)

# -----------------------------------------------------------------------------------------------------
# data: memmapped token arrays, a random (clip, view) per sample, then Dirichlet masking

try:   # a missing meta.json, a missing or empty train split, a bad file: one line that names it
    tok_path, meta, splits = modalities.open_tokenized(dataset, data_root, ['train'], also=['val'])
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"train.py: {e}")
for _m in modalities.MODALITIES:
    _v = meta['modalities'].get(_m.name, {}).get('vocab')
    if _v is None or _v > _m.vocab:
        raise SystemExit(f"{tok_path}/meta.json: modality {_m.name} has vocab {_v}, expected <= {_m.vocab}")
n_train = len(splits['train']['label'])
train_rows = None               # the train rows a subset run draws from (None: all)
if max_train_clips:
    from rawdata import train_subset   # class x source stratified, nested, fixed by the seed
    try:
        train_rows = train_subset(dataset, data_root, splits['train'], max_train_clips, seed,
                                  report_to=out_dir if master_process else None)
    except ValueError as e:
        raise SystemExit(f"train.py: {tok_path}: {e}")
    n_train = max_train_clips
num_clips = {s: (n_train if s == 'train' else len(a['label'])) for s, a in splits.items()}
if master_process:
    print(f"data: {tok_path}, " + ", ".join(f"{s} {n} clips" for s, n in num_clips.items()))

# two generators so that runs are reproducible and resumable: clip/view choice on the host, masking where the
# model runs (masking.build_batch is sync-free and CUDA-graphed on the GPU, so it costs the host ~nothing)
data_gen = torch.Generator().manual_seed(seed + seed_offset)
mask_gen = torch.Generator(device=device).manual_seed(seed + seed_offset + 1)


def get_batch(split, data_generator, mask_generator, augment=False):
    """One batch as a dict of device tensors (see masking.build_batch): batch_size random (clip, view)
    pairs read from the memmaps, moved to the device, masked there."""
    n = num_clips[split]
    clips = torch.randint(n, (batch_size,), generator=data_generator).numpy()
    if split == 'train' and train_rows is not None:
        clips = train_rows[clips]
    views = torch.randint(modalities.NUM_VIEWS, (batch_size,), generator=data_generator).numpy()
    tokens, _labels = modalities.gather_views(splits[split], clips, views)
    if augment and augment_shift:              # training steps only: the loss estimates see the data as it is
        tokens = modalities.shift_grids(tokens, augment_shift, data_generator)
    if device_type == 'cuda':
        tokens = {k: v.pin_memory().to(device, non_blocking=True) for k, v in tokens.items()}
    else:
        tokens = {k: v.to(device) for k, v in tokens.items()}
    batch = build_batch(tokens, mask_cfg, mask_generator, cuda_graph=fast_path)
    if augment and cond_dropout:               # training steps only, like the shifts
        batch = condition_dropout(batch, cond_dropout, mask_generator)
    if augment and audio_levels:               # an experiment beside the recipe (levels.py)
        import levels
        batch = levels.audio_levels(batch, audio_levels, mask_generator)
    if device_type == 'cpu' and not compile:
        batch = trim_padding(batch)   # cheaper for the padded path, no change for the packed one
    batch['dec_counts'] = None
    if fast_path and not static_head:   # the fast head's counts, copied to the host now (fastpath.target_counts)
        import fastpath
        batch['dec_counts'] = fastpath.target_counts(raw_model, batch['dec_pos'], batch['dec_valid'], batch['dec_ids'])
    return batch


def model_inputs(batch):
    return (batch['enc_ids'], batch['enc_pos'], batch['enc_valid'], batch['dec_pos'], batch['dec_valid'],
            batch['dec_ids'], batch['dec_counts'])


# -----------------------------------------------------------------------------------------------------
# model, optimizer, resume

iter_num = 0
best_val_loss = 1e9
checkpoint = None
ckpt_path = os.path.join(out_dir, 'ckpt.pt')


def _load_ckpt(path):
    try:
        return read_checkpoint(path, device, trust_checkpoint)
    except ValueError as e:   # not a checkpoint, or one that would run code to load (files.load_torch_file)
        raise SystemExit(f"train.py: {e}")


# (adapters.py's code features: this dataset's, except on resume, where the checkpoint holds them)
model_args['adapters'], block_lr_scale, _features = resolve_adapters(tok_path, meta) if init_from != 'resume' \
    else resolve_adapters()
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"--init_from=resume but {ckpt_path} does not exist")
    print(f"resuming from {ckpt_path}")
    checkpoint = _load_ckpt(ckpt_path)
    model = model_from_checkpoint(checkpoint)        # the architecture comes from the checkpoint
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
elif init_from == 'scratch' or init_from.endswith('.pt'):   # or another run's weights, fresh optimizer and schedule
    if init_from != 'scratch' and not os.path.exists(init_from):
        raise SystemExit(f"--init_from={init_from} does not exist: train the run that writes it first (for the "
                         f"ToyZoo default: python train.py config/toyzoo_rgb.py), or pass --init_from=scratch")
    try:
        model = Nano4M(Nano4MConfig(**model_args))
        if init_from != 'scratch':
            print(f"warm start from the weights of {init_from}")
            warm_start(model, _load_ckpt(init_from))
        # an id means what this dataset's tokenizer says it means, whatever run the weights come from
        _changed = model.adapters.set_code_features(_features) if model.adapters is not None else []
    except ValueError as e:
        raise SystemExit(f"train.py: {e}" if init_from == 'scratch' else f"--init_from={init_from}: {e}")
    if _changed and init_from != 'scratch' and master_process:
        print(f"code features of {', '.join(_changed)} differ from {init_from}'s: this dataset's are used")
else:
    raise SystemExit(f"--init_from must be 'scratch', 'resume' or a path to a ckpt.pt, not {init_from!r}")
model_args = asdict(model.config)
model.to(device)
if static_head and (model.config.head == 'full' or not fast_path):
    raise SystemExit("train.py: --static_head=True is a form of the fast per-modality head (head='modality', "
                     "--fast_path=True)")
model.fast, model.packed, model.static_head = fast_path, use_packing, static_head   # how the step is computed, not what
if master_process:
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {model_args}")
    _head = 'full' if model.config.head == 'full' else ('static' if static_head else 'per-modality')
    print(f"step: packing {'on' if use_packing else 'off'}, head {_head}" + ('' if fast_path else ' (plain)'))

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, block_lr_scale)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    rng = checkpoint['rng']
    if len(rng['data']) == ddp_world_size:
        data_gen.set_state(rng['data'][ddp_rank]['data'].cpu())
        mask_gen.set_state(rng['data'][ddp_rank]['mask'].cpu())
    else:   # resumed on a different world size: the curve cannot continue exactly; reseed per iter
        print(f"rank {ddp_rank}: checkpoint has {len(rng['data'])} data-rng states, world size "
              f"{ddp_world_size}; reseeding the data rngs")
        data_gen.manual_seed(seed + seed_offset + 1000003 * iter_num)
        mask_gen.manual_seed(seed + seed_offset + 1000003 * iter_num + 1)
    torch.set_rng_state(rng['torch'].cpu())
    if device_type == 'cuda' and rng.get('cuda') is not None:
        torch.cuda.set_rng_state(rng['cuda'].cpu())
checkpoint = None   # free memory

raw_model = model
if compile:
    print(f"compiling the trunk, mode {compile_mode} (takes a minute)...")
    model.compile_trunk(mode=compile_mode)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)


@torch.no_grad()
def estimate_loss():
    """Per-modality mean CE over eval_iters batches of each split; the batches come from a fixed seed so
    every eval scores the same (clip, view, mask) draws. 'loss' averages the present modalities equally."""
    out = {}
    model.eval()
    for split in splits:
        gens = (torch.Generator().manual_seed(seed + 7919), torch.Generator(device=device).manual_seed(seed + 7920))
        sums = {name: 0.0 for name in modalities.MODALITY_NAMES}
        counts = {name: 0.0 for name in modalities.MODALITY_NAMES}
        for _ in range(eval_iters):
            batch = get_batch(split, *gens)
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with ctx:
                _, per_modality = model(*model_inputs(batch))
            for name, (s, c) in per_modality.items():
                sums[name] += s.item()
                counts[name] += c.item()
        ce = {name: sums[name] / counts[name] for name in sums if counts[name] > 0}
        out[split] = {'loss': sum(ce.values()) / max(len(ce), 1), **ce}
    model.train()
    return out


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / max(lr_decay_iters - warmup_iters, 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def rng_states(data_state):
    """RNG states to store: the data rngs of every rank (as they were before drawing the upcoming batch),
    and torch's. All ranks must call this together under DDP."""
    states = [data_state]
    if ddp:
        states = [None] * ddp_world_size
        torch.distributed.all_gather_object(states, data_state)
    return {'data': states, 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}


def save_checkpoint(rng):
    ckpt = {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'model_args': model_args,
            'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': config, 'rng': rng,
            'audio_layout': asdict(modalities.AUDIO_LAYOUT)}   # the dataset's (load_meta set it); model.load_checkpoint
    tmp = ckpt_path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, ckpt_path)   # never a half-written ckpt.pt


def append_jsonl(name, row):
    with open(os.path.join(out_dir, name), 'a') as f:
        f.write(json.dumps(row) + '\n')


if master_process and init_from != 'resume':
    for _name in ('log.jsonl', 'train_log.jsonl'):   # a fresh run starts fresh logs
        if os.path.exists(os.path.join(out_dir, _name)):
            os.remove(os.path.join(out_dir, _name))
if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config, mode=wandb_mode, dir=out_dir)

# -----------------------------------------------------------------------------------------------------
# training loop

def data_rng_state():
    return {'data': data_gen.get_state(), 'mask': mask_gen.get_state()}


data_state = data_rng_state()   # the data rngs before the batch of the current iteration
batch = get_batch('train', data_gen, mask_gen, augment=True)
t0 = time.time()
local_iter_num = 0
running_mfu = -1.0
while True:
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr * param_group.get('lr_scale', 1.0)

    last_step = iter_num >= max_iters   # the model after max_iters updates: evaluated, saved, and the run ends
    if iter_num % eval_interval == 0 or last_step:
        rng = rng_states(data_state)
        if master_process:
            losses = estimate_loss()
            print(f"eval {iter_num}: train loss {losses['train']['loss']:.4f}" +
                  (f", val loss {losses['val']['loss']:.4f}" if 'val' in losses else '') + " | val " +
                  " ".join(f"{k}={v:.3f}" for k, v in losses.get('val', losses['train']).items() if k != 'loss'))
            append_jsonl('log.jsonl', {'iter': iter_num, 'lr': lr, **{s: losses[s] for s in losses}})
            if wandb_log:
                wandb.log({'iter': iter_num, 'lr': lr,
                           **{f'{s}/{k}': v for s in losses for k, v in losses[s].items()}})
            val_loss = losses.get('val', losses['train'])['loss']
            if val_loss < best_val_loss or always_save_checkpoint:
                best_val_loss = min(best_val_loss, val_loss)
                if iter_num > 0:
                    print(f"saving checkpoint to {out_dir}")
                    save_checkpoint(rng)
    if eval_only or last_step:
        break

    # forward / backward, with gradient accumulation; the next batch is drawn while the GPU works
    for micro_step in range(gradient_accumulation_steps):
        if ddp:
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            loss, per_modality = model(*model_inputs(batch))
            loss = loss / gradient_accumulation_steps
        scaler.scale(loss).backward()
        data_state = data_rng_state()
        batch = get_batch('train', data_gen, mask_gen, augment=True)
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
        lossf = loss.item() * gradient_accumulation_steps   # .item() syncs: only at log steps
        per = {k: (s / c).item() for k, (s, c) in per_modality.items() if c.item() > 0}
        if local_iter_num >= 5 and device_type == 'cuda':   # let the first steps (compile, warm-up) pass
            import fastpath
            mfu = fastpath.estimate_mfu(raw_model, batch_size * gradient_accumulation_steps * ddp_world_size,
                                        mask_cfg.max_input_tokens, mask_cfg.max_target_tokens, dt, peak_flops)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        print(f"iter {iter_num}: loss {lossf:.4f} | " + " ".join(f"{k}={v:.3f}" for k, v in per.items()) +
              f" | lr {lr:.2e} | {tokens_per_iter / dt:,.0f} tok/s | {dt * 1000:.1f} ms" +
              (f" | mfu {running_mfu * 100:.2f}%" if device_type == 'cuda' and running_mfu >= 0 else ''))
        append_jsonl('train_log.jsonl', {'iter': iter_num, 'loss': lossf, **per, 'lr': lr, 'ms': dt * 1000})
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/step_loss': lossf, 'lr': lr, 'mfu': running_mfu})
    iter_num += 1
    local_iter_num += 1

if ddp:
    destroy_process_group()
