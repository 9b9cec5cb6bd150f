"""Your own training loop under torchrun (DistributedDataParallel), driven by a sparsekit recipe.

Runs on a CPU in a few seconds: torchrun --nproc_per_node 2 docs/examples/own_loop_ddp.py
"""

import os

import timm
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparsekit
from sparsekit.surgery.global_noise import GlobalBatchNoise

# 1. Join the process group torchrun describes (gloo on CPU, nccl on GPUs).
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")

# 2. Same seed on every rank: same model, same masks, and (below) the same random numbers for
#    the whole global batch, of which each rank keeps its own rows.
torch.manual_seed(0)
recipe = sparsekit.load_recipe(
    {
        "name": "ddp_demo",
        "training": {"epochs": 2, "batch_size": 16, "schedule": {"warmup": 0}},
        "phases": [
            {
                "kind": "unstructured_dst",
                "sparsity": 0.5,
                "update_every": "3 steps",
                "min_update_interval": "1 steps",
            },
            {
                "kind": "head_prune_grow",
                "head_density": 0.67,
                "update_every": "3 steps",
                "min_update_interval": "1 steps",
            },
            {"kind": "token_select", "keep_ratio": 0.75},
        ],
    }
)
model = timm.create_model(
    "deit_tiny_patch16_224",
    pretrained=False,
    img_size=32,
    patch_size=8,
    depth=2,
    num_classes=10,
    drop_path_rate=0.1,
).to(device)
GlobalBatchNoise(model)  # stochastic depth drawn for the global batch, as one process draws it

# 3. Compile on the model itself (not the DDP wrapper), then build the optimizer: the token
#    selector adds parameters. Modifiers change the model's own weights in place, and the
#    wrapper shares them.
steps_per_epoch = 4
timeline = sparsekit.Timeline(recipe.training.epochs, steps_per_epoch)
modifiers = sparsekit.compile_recipe(recipe, model, timeline)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
session = sparsekit.Session(model, optimizer, modifiers, timeline)
wrapped = DistributedDataParallel(model, find_unused_parameters=True)

# 4. Each rank trains on its share of every global batch (the recipe states the global batch).
share = recipe.training.batch_size // world
data = torch.Generator().manual_seed(0)
for epoch in range(recipe.training.epochs):
    for _ in range(steps_per_epoch):
        images = torch.randn(recipe.training.batch_size, 3, 32, 32, generator=data)
        labels = torch.randint(0, 10, (recipe.training.batch_size,), generator=data)
        mine = slice(rank * share, (rank + 1) * share)
        session.batch_start()
        loss = nn.functional.cross_entropy(
            wrapped(images[mine].to(device)), labels[mine].to(device)
        )
        loss.backward()
        session.before_optimizer_step()  # masks the (already averaged) gradients
        optimizer.step()
        optimizer.zero_grad()
        session.after_optimizer_step()  # updates, then a cross-rank check of the masks
    session.epoch_end()
    if rank == 0:
        heads = sum(int(k.sum()) for n, k in session.unit_masks().items() if n.endswith("attn"))
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, step {session.step}, heads kept {heads}")
session.finalize()
dist.destroy_process_group()
