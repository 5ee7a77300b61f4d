"""Run by the DDP test under torchrun: train the toy model and save its parameters."""

import sys

import torch

from duplex.train import TrainConfig, train
from tests.train import toy

out = sys.argv[1]
model = toy.make_model()
cfg = TrainConfig(out_dir=out, steps=5, batch_size=8, lr=1e-2, warmup_steps=2, progress=False)
train(model, toy.make_batch, toy.loss_fn, cfg)
if int(__import__("os").environ["RANK"]) == 0:
    torch.save(model.state_dict(), f"{out}/params.pt")
