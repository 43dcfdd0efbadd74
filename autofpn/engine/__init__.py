"""Training machinery shared by train.py and the search loop.

- ``solver``: SGD with norm/bias parameters out of weight decay, warm-up + step/cosine schedule.
- ``checkpoint``: atomic ``torch.save``, last-K + best retention, RNG state capture/restore.
- ``distributed``: torchrun env -> process group (NCCL on GPU, Gloo on CPU), collective helpers.
- ``logging``: JSON-lines metrics log and the rank-0 tqdm bar.
- ``trainer``: ``Trainer`` (the fixed-detector loop) and the reusable step helpers
  (``check_finite_losses``, ``set_loader_position``, ``move_to_device``, ``seed_everything``).
"""
