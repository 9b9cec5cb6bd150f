"""Do 2:4 layers really run faster? Dense against semi-structured 2:4, timed side by side on a GPU.

Builds DeiT-Base (224 px, random weights: the values do not change the cost), gives the chosen
Linear layers a 2:4 mask (2 of every 4 consecutive input weights kept, the N highest |w| of
each group, as `unstructured_dst` with `pattern: "2:4"` trains them), and converts them with
sparsekit's accelerate path (`torch.sparse.to_sparse_semi_structured`). Three models, in one
run: dense, 2:4 on the MLP layers (fc1, fc2), and 2:4 on every block Linear (qkv, proj, fc1,
fc2). Each is checked against the dense model holding the same masked weights, then timed in
eval mode under `torch.inference_mode`, interleaved (dense, MLP, all, dense, ...) after a
warm-up, with CUDA events; it prints the median time ratios against dense per dtype and batch.

    python benchmarks/nm_speed.py                            # float16 and bfloat16, batch 64, 256
    python benchmarks/nm_speed.py --dtype float16 --batch 64 --repeats 50

Semi-structured sparsity needs CUDA and compute capability 8.0 or newer; elsewhere the script
says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.export.accelerate import ACCELERATED_DTYPES, accelerate_, check_device
from sparsekit.models import ModelSpec, create_model, resolve_model_name
from sparsekit.surgery.nm_masks import nm_topk_mask

MLP = ("mlp.fc1", "mlp.fc2")
ALL = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def masked_2_4(model: nn.Module, suffixes: tuple[str, ...]) -> dict[str, str]:
    """Zero all but the 2 largest |w| of every 4 inputs in the layers ending in `suffixes`;
    returns their marks, as an export's manifest holds them."""
    marks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(suffixes) and "blocks." in name:
                module.weight.mul_(nm_topk_mask(module.weight.abs(), 2, 4))
                marks[name] = "2:4"
    return marks


def timed(model: nn.Module, x: torch.Tensor) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    model(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_base")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", choices=[*ACCELERATED_DTYPES, "both"], default="both")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    try:
        device = check_device()
    except SparsekitError:
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        print(
            "nm_speed needs CUDA on a GPU of compute capability 8.0 or newer (sparse tensor "
            f"cores for 2:4); this machine has {where}. Nothing measured."
        )
        return 0

    spec = ModelSpec(resolve_model_name(args.model), {"img_size": args.img_size})
    dtypes = list(ACCELERATED_DTYPES) if args.dtype == "both" else [args.dtype]
    print(
        f"{spec.name} at {args.img_size} px on {torch.cuda.get_device_name(device)}, torch "
        f"{torch.__version__}; median of {args.repeats} interleaved passes after {args.warmup}"
    )
    print("| dtype | batch | dense ms | 2:4 MLP ms | ratio | 2:4 all ms | ratio | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name in dtypes:
        dtype = ACCELERATED_DTYPES[dtype_name]
        torch.manual_seed(0)
        base = create_model(spec).eval()
        models, references = {"dense": base.to(device, dtype)}, {}
        for label, suffixes in (("mlp", MLP), ("all", ALL)):
            masked = copy.deepcopy(base)
            marks = masked_2_4(masked, suffixes)
            references[label] = copy.deepcopy(masked)  # dense kernels, the same zeros
            accelerate_(masked, marks, f"{spec.name} ({label})")
            models[label] = masked
        for batch in args.batch:
            x = torch.randn(batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
            with torch.inference_mode():
                diff = max(
                    (models[k](x).float() - references[k](x).float()).abs().max().item()
                    for k in references
                )
                for _ in range(args.warmup):
                    for model in models.values():
                        model(x)
                times: dict[str, list[float]] = {k: [] for k in models}
                for _ in range(args.repeats):
                    for key, model in models.items():
                        times[key].append(timed(model, x))
            ms = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"| {dtype_name} | {batch} | {ms['dense']:.2f} | {ms['mlp']:.2f} | "
                f"**{ms['mlp'] / ms['dense']:.3f}** | {ms['all']:.2f} | "
                f"**{ms['all'] / ms['dense']:.3f}** | {diff:.2e} |"
            )
        del models, references
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
