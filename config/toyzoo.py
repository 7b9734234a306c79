# A small run on the synthetic ToyZoo world that fits ~10 minutes on 2 CPU cores (first version; tune on
# real ToyZoo tokens). At this width the 50,304-row embedding and head and the per-modality logits cost more
# than the trunk, so the budgets are kept small and the steps many.
#   python prepare_data.py && python tokenize_all.py && python train.py config/toyzoo.py

out_dir = 'out/toyzoo'
dataset = 'toyzoo'
eval_interval = 250
eval_iters = 10
log_interval = 25
wandb_run_name = 'toyzoo-d2-2w128'

batch_size = 16
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100              # ~5% of the run, as 916 / 18,311 in the report
learning_rate = 2e-3            # a small model on a small world: a higher peak than the report's 1e-4
min_lr = 2e-5

n_enc_layer, n_dec_layer, n_embd, n_head = 2, 2, 128, 2

input_budget = (8, 64)
target_budget = (8, 32)

device = 'cpu'
dtype = 'float32'
threads = 2
