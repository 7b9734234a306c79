# The embedded default: a small run on the synthetic ToyZoo world in two stages, ~25-45 minutes of training on
# 2 CPU cores (~8-17 + ~16-28; the whole quickstart -- prepare, tokenize, train -- in ~30-55 minutes, docs/speed.md).
#   python prepare_data.py && python tokenize_all.py
#   python train.py config/toyzoo_rgb.py      # stage 1: rgb -> caption alone (learn to read a picture)
#   python train.py config/toyzoo.py          # stage 2, this file: every task, from stage 1's weights
#
# Masking: the usual 4M Dirichlet recipe for 7% of the batches; the rest are the report's "whole
# modality from one other" conditions (its second fix), so that what sample.py and evaluate.py ask at
# inference -- audio -> caption (classification), rgb -> caption (the class from the picture, which retrieval
# needs from both sides), caption -> audio (class-only generation), rgb -> depth / normal -- is a condition the
# model has seen in training.
# Retrieval (audio <-> rgb) rides along: the audio -> caption batches also predict 32 random rgb tokens, and
# the rgb batches 32 audio tokens, from the same whole input. The encoder pass, most of a step's cost, is
# shared, so the binding costs only the extra decoder rows. (Whole audio <-> rgb batches of their own cost a
# third of the run and bought no retrieval; docs/experiments.md, "what moves audio -> class".)
# Ids: each modality has embedding and head rows of its own (separate_vocab, not the report's one shared
# table), and every audio / depth / normal id also reads the vector its tokenizer gives it (code_features:
# the patch it decodes to, its log-mel codebook vector); an rgb input id reads only its patch (feature_only),
# through two 3x3 convolutions over the grid (grid_conv), with PyTorch's Linear init (init='torch'): the
# inputs, locality prior and init under which the model learns to read a picture (docs/experiments.md).
# At this width the embeddings and head cost more than the trunk; on a CPU train.py trims the padded slots a
# batch does not use, so the whole-modality components only cost what they use.

out_dir = 'out/toyzoo'
dataset = 'toyzoo'
init_from = 'out/toyzoo_rgb/ckpt.pt'   # stage 1 (config/toyzoo_rgb.py); --init_from=scratch to skip it
eval_interval = 250
eval_iters = 10
log_interval = 25
wandb_run_name = 'toyzoo-d2-2w128'

batch_size = 16
max_iters = 3000
lr_decay_iters = 3000
warmup_iters = 150              # 5% of the run, as 916 / 18,311 in the report
learning_rate = 2e-3            # a small model on a small world: a higher peak than the report's 1e-4
min_lr = 2e-5

n_enc_layer, n_dec_layer, n_embd, n_head = 2, 2, 128, 2
cross_local = 1.0               # half the cross-attention heads pay per place of distance (locality.py; no weights,
                                # so stage 1's carry over): depth and normal cells read the picture where they stand
adapters = dict(separate_vocab=True,
                code_features=True,     # needs the dataset's codebooks (tokenize_all.py writes them)
                feature_only=('tok_rgb',), grid_conv=True, init='torch',
                block_lr_scale=0.25,    # the lr above is for the embeddings and head; the blocks get 5e-4
                factored_head=('tok_depth', 'tok_normal'))   # each cell's mean code and shape code: two small
                                        # softmaxes, not one over 8,192 ids (adapters.py; docs/experiments.md)
_none = (0.0,) * 5
_only = {m: tuple(float(i == k) for i in range(5)) for k, m in enumerate(('rgb', 'depth', 'normal', 'audio'))}


def _whole(source, target, weight, also=None, n_also=32):
    """the whole source in, the whole target out; also: n_also tokens of one more modality out"""
    return dict(weight=weight, input_full=(source,), input_alphas=_none, input_budget=(0, 0),
                target_full=(target,), target_alphas=_only[also] if also else _none,
                target_budget=(n_also, n_also) if also else (0, 0))


# rgb -> depth takes the largest share: stage 1 already taught rgb -> caption, and depth needs ~1,000+ batches
# to beat the mean map (docs/experiments.md, issue #33). Weights are relative (masking normalises them):
# shares 7 / 18 / 8 / 8 / 45 / 14%
_mixture = [dict(weight=0.07),                           # the 4M recipe with the budgets below
           _whole('audio', 'caption', 0.18, also='rgb'),  # audio -> class
           _whole('rgb', 'caption', 0.08, also='audio'),  # rgb -> class
           _whole('caption', 'audio', 0.08),            # class-only generation
           _whole('rgb', 'depth', 0.45, also='audio'),    # structure from rgb (depth codes on one global scale:
           _whole('rgb', 'normal', 0.14, also='audio')]   # tokenize_all.py's default)
masking = dict(input_budget=(8, 64), target_budget=(8, 64), mixture=_mixture,
               mixture_per_batch=True)   # one component per batch: on a CPU the unused padding is dropped
packing = 'off'                 # these batches hold little padding: packed steps measured ~6% slower here

# device and threads stay train.py's: the GPU when there is one, else every CPU core
