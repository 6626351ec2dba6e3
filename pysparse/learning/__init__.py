"""Learning: the trainer the learning passes share (train: AdamW, schedules, checkpoints,
resume, FSDP2), their objectives (objectives: distillation, causal LM) and data / model
parallelism over torch.distributed (distributed).

May import: compiler, capture, kernels, util.
"""
