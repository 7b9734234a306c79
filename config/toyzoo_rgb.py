# Stage 1 of the ToyZoo default: the model learns to read a picture first, on rgb -> caption batches alone
# (4 epochs of the train pictures, ~8-17 minutes on 2 CPU cores). Stage 2 is config/toyzoo.py, which starts
# from these weights:
#   python train.py config/toyzoo_rgb.py && python train.py config/toyzoo.py
#
# Why a stage of its own: trained on that task alone this model names the class of 67% of the test pictures;
# trained from scratch on the multitask mix it names 29-38%, whatever the number of rgb -> caption batches
# (docs/experiments.md, "Runs that tried to lift rgb -> class"). The audio is learnt fast in stage 2; the
# picture is not, unless it comes first.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'toyzoo.py')).read())   # stage 2's model, data, optimiser
init_from = 'scratch'
out_dir = 'out/toyzoo_rgb'
wandb_run_name = 'toyzoo-d2-2w128-rgb'
max_iters = lr_decay_iters = 2200        # 2,200 x 16 = 35,200 pictures: 4 epochs of the 8,800 train views
masking = dict(masking, mixture=[_whole('rgb', 'caption', 1.0)])
cross_local = 0.0               # stage 1 as measured; stage 2 adds the local heads (they hold no weights)
