"""FSDP2 gradient reduction over many micro-batches: bf16 vs fp32 reduce dtype, every micro-batch vs one no_sync step.

A MemTrainer step runs one backward per micro-batch (hundreds for a long document). This measures, with real FSDP2
(``fully_shard``) on CPU/gloo, how far a step's summed gradient lands from an fp64 reference under bf16 compute,
for the reduction choices MemTrainer could make:

    torchrun --nproc_per_node 2 benchmarks/fsdp_reduce.py [--micro_batches 200]

Prints one line per choice (relative error, and its ratio to the old choice: no_sync + bf16 reduce) and a JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def reference_gradient(weight: torch.Tensor, data: list[torch.Tensor], world: int) -> torch.Tensor:
    """The step's gradient in fp64, averaged over processes as FSDP does."""
    ref = weight.detach().double().clone().requires_grad_(True)
    for x in data:
        (x.double() @ ref.T).pow(2).mean().div(len(data)).backward()
    grad = ref.grad.clone()
    dist.all_reduce(grad)
    return grad / world


def step_error(base: torch.nn.Linear, data: list[torch.Tensor], reference: torch.Tensor, reduce_dtype, every: bool):
    """Relative error of one FSDP2 step's gradient: bf16 compute, ``reduce_dtype`` reduction, synced every
    micro-batch (``every``) or only after the last one (no_sync before it)."""
    model = torch.nn.Linear(base.in_features, base.out_features, bias=False)
    model.load_state_dict(base.state_dict())
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype))
    for k, x in enumerate(data):
        model.set_requires_gradient_sync(every or k == len(data) - 1)
        model(x).float().pow(2).mean().div(len(data)).backward()
    full = model.weight.grad.full_tensor().double()
    return float((full - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro_batches", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = torch.nn.Linear(args.hidden, args.hidden, bias=False)
    data = [
        torch.randn(4, args.hidden, generator=torch.Generator().manual_seed(1000 * rank + k))
        for k in range(args.micro_batches)
    ]
    reference = reference_gradient(base.weight, data, world)
    choices = {
        "no_sync + bf16 reduce (before)": (torch.bfloat16, False),
        "every micro-batch + bf16 reduce": (torch.bfloat16, True),
        "every micro-batch + fp32 reduce (MemTrainer)": (torch.float32, True),
        "no_sync + fp32 reduce": (torch.float32, False),
    }
    errors = {name: step_error(base, data, reference, *choice) for name, choice in choices.items()}
    if rank == 0:
        baseline = errors["no_sync + bf16 reduce (before)"]
        for name, error in errors.items():
            print(f"{name}: relative error {error:.2e} ({error / baseline:.2f} x before)")
        summary = {"micro_batches": args.micro_batches, "processes": world, "relative_error": errors}
        print(json.dumps({"benchmark": "fsdp_reduce", **summary}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
