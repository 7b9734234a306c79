# caption -> audio alone, the test bed of issue #31: the ToyZoo default's model and optimiser, from scratch; half
# the batches the whole audio from the caption, half the caption plus a random share of the audio in and the rest
# out (infill: the condition of MaskGIT's later steps). Its levers are flags, e.g. (docs/experiments.md):
#   python train.py config/toyzoo_caption_audio.py --pos_emb=sincos_layout --mimetic_cross=2.0
#   python evaluate.py --out_dir=out/toyzoo_caption_audio --split=val --probes=generation
import os
exec(open(os.path.join(os.path.dirname(__file__), 'toyzoo.py')).read())   # stage 2's model, data, optimiser
init_from = 'scratch'
out_dir = 'out/toyzoo_caption_audio'
wandb_run_name = 'toyzoo-d2-2w128-caption-audio'
max_iters = lr_decay_iters = 1200
warmup_iters = 60
_infill = dict(weight=0.5, input_full=('caption',), input_alphas=_only['audio'], input_budget=(0, 448),
               target_full=('audio',), target_alphas=_none, target_budget=(0, 0))
masking = dict(masking, mixture=[_whole('caption', 'audio', 0.5), _infill])
cross_local = 0.0               # this test bed's control as measured; the levers are flags
