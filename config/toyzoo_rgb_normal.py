# rgb -> normal alone, the other half of issue #33's test bed: config/toyzoo_rgb_depth.py with normal targets.
#   python train.py config/toyzoo_rgb_normal.py --pos_emb=sincos_layout --mimetic_cross=2.0
import os
exec(open(os.path.join(os.path.dirname(__file__), 'toyzoo_rgb_depth.py')).read())
out_dir = 'out/toyzoo_rgb_normal'
wandb_run_name = 'toyzoo-d2-2w128-rgb-normal'
masking = dict(masking, mixture=[_whole('rgb', 'normal', 1.0)])
