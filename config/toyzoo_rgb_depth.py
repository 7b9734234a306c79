# rgb -> depth alone, the test bed of issue #33: the ToyZoo default's model and optimiser, every batch the whole
# picture in and the whole depth map out, from scratch. Its levers are flags, e.g. (docs/experiments.md):
#   python tokenize_all.py --dataset=NAME --depth_norm=image   # the per-image depth codes of before (global: the default)
#   python train.py config/toyzoo_rgb_depth.py --dataset=NAME --pos_emb=sincos_layout --mimetic_cross=2.0
#   python evaluate.py --out_dir=out/toyzoo_rgb_depth --split=val --probes=structure
import os
exec(open(os.path.join(os.path.dirname(__file__), 'toyzoo.py')).read())   # stage 2's model, data, optimiser
init_from = 'scratch'
out_dir = 'out/toyzoo_rgb_depth'
wandb_run_name = 'toyzoo-d2-2w128-rgb-depth'
masking = dict(masking, mixture=[_whole('rgb', 'depth', 1.0)])
cross_local = 0.0               # this test bed's control as measured; the levers are flags
