"""Train a tiny sparse ViT with your own loop, driven by a sparsekit recipe.

Runs in under a minute on a CPU: python docs/examples/own_loop.py
"""

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsekit

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"

# 1. The recipe: a dict here; a YAML path works the same way. Spans in % follow `epochs`.
recipe = sparsekit.load_recipe(
    {
        "name": "own_loop_demo",
        "training": {
            "epochs": 2,
            "batch_size": 16,
            "optimizer": {"lr": 1.0e-3},
            "schedule": {"warmup": "10%"},  # the default (5 epochs) is longer than this run
            "grad_clip": 1.0,
        },
        "phases": [
            {"kind": "dense_warmup", "end": "25%"},
            {
                "kind": "unstructured_dst",
                "start": "25%",  # masks appear here ...
                "end": "75%",  # ... prune/grow stops here; masks stay to the end
                "sparsity": 0.8,
                "init": "magnitude",  # first mask: largest warmed-up weights
                "update_every": "2 steps",
                "min_update_interval": "1 steps",
                "grow_accumulation": 2,
            },
        ],
    }
)
cfg = recipe.training

# 2. Model, data and optimizer: all yours.
model = timm.create_model(
    "deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
).to(device)
images, labels = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
loader = DataLoader(TensorDataset(images, labels), batch_size=cfg.batch_size, shuffle=True)
optimizer = torch.optim.AdamW(
    model.parameters(),
    lr=cfg.optimizer.lr,
    weight_decay=cfg.optimizer.weight_decay,
    fused=True,  # much faster, and the default kernel slows on the zeros sparsity leaves
)
criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
use_fp16 = device == "cuda"
scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)  # a no-op on CPU

# 3. The session. Give it the *unwrapped* model (model.module under DDP, model._orig_mod after
#    torch.compile) and the number of optimizer steps per epoch.
session = sparsekit.Session.from_recipe(recipe, model, optimizer, steps_per_epoch=len(loader))
train_model = model  # wrap this one (DDP, torch.compile) if you like; the session keeps `model`

for epoch in range(cfg.epochs):
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        session.batch_start()  # masks appear when their phase starts
        with torch.autocast(device, dtype=torch.float16, enabled=use_fp16):
            loss = criterion(train_model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # real gradients before the session sees them
        session.before_optimizer_step()  # collect growth gradients, zero masked grads
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # clip after the session
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        session.after_optimizer_step()  # re-apply masks; prune/grow on update steps
    session.epoch_end()
    for event in session.events:  # mask_init and mask_update events since the last drain
        if event["event"] != "mask_update":
            continue
        print(
            f"  update at step {event['step']}: fraction {event['fraction']:.3f}, "
            f"{event['regrown']} weights regrown"
        )
    session.events.clear()
    masks = session.masks()
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    print(
        f"epoch {epoch + 1}: loss {loss.item():.3f}, step {session.step}, "
        f"sparsity of targets {1 - kept / total:.4f}"
    )
session.finalize()

# 4. Check what the recipe promised: exact sparsity, and masked weights exactly zero.
params = dict(model.named_parameters())
for name, mask in session.masks().items():
    assert torch.count_nonzero(params[name][~mask]) == 0, name
print(
    f"{len(masks)} sparse weights, {kept:,} of {total:,} kept "
    f"({1 - kept / total:.4f} sparse, asked for {recipe.phases[1].sparsity})"
)

# 5. Give the model back plain: the phases take their hooks and changes out again.
session.close()
assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
print("session closed: a plain timm model again")
