"""FoRA on several processes: DDP through ``accelerate`` (default) or FSDP2 (``--fsdp``).

    python examples/accelerate_fora.py                                    # one process
    torchrun --nproc_per_node 2 examples/accelerate_fora.py               # 2 processes, gloo (CPU)
    accelerate launch --multi_gpu --num_processes 8 examples/accelerate_fora.py   # 8 GPUs, NCCL
    torchrun --nproc_per_node 2 examples/accelerate_fora.py --fsdp        # FSDP2 fully_shard

A tiny random Llama and a learnable synthetic rule, so it runs on CPU in seconds; on GPUs the
same script uses NCCL (``torchrun --nproc_per_node 8 ...``). What happens:

1. Every rank scores the blocks on its *own* calibration shard; ``apply_fora`` sums the Fisher
   sums and counts over the default process group, so every rank adapts the same blocks.
2. DDP: ``fora_optimizer`` (a ``StiefelAdam``) is prepared by accelerate; the averaged gradient
   makes every replica take the same Stiefel step. FSDP2: the decoder layers are sharded with
   ``fully_shard`` (Stiefel factors along their long dimension) and ``fora_optimizer`` returns
   a ``ShardedStiefelAdam``, which steps the local rows with p x p all-reduces only.
3. Rank 0 prints the loss, the orthonormality of the constrained factors and whether the
   ranks agree. See ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import transformers

from stiefel_peft import apply_fora, fora_optimizer
from stiefel_peft.fora import constrained_parameters
from stiefel_peft.geometry import orthogonality_error


def tiny_model() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)  # the same weights on every rank
    return transformers.LlamaForCausalLM(config)


def rule_batches(count: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """A learnable rule: the last token is the first token plus one (loss on it only)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(2, 62, (batch_size, 8), generator=generator)
        ids[:, -1] = ids[:, 0] + 1
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def shard_model(model: torch.nn.Module, stiefel_factor: str) -> None:
    """FSDP2: each decoder layer, then the root; Stiefel factors sharded along ``n``."""
    from torch.distributed.fsdp import fully_shard

    from stiefel_peft.distributed import stiefel_shard_placement

    factors = [param for _, param in constrained_parameters(model, stiefel_factor)]
    placement = stiefel_shard_placement(factors)  # Shard(1) for a wide lora_A, else default
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)


def worst_orthogonality(model: torch.nn.Module, stiefel_factor: str) -> float:
    worst = 0.0
    for _, param in constrained_parameters(model, stiefel_factor):
        whole = param.full_tensor() if hasattr(param, "full_tensor") else param  # gathers (check)
        frame = whole.detach() if whole.shape[0] >= whole.shape[1] else whole.detach().mT
        worst = max(worst, float(orthogonality_error(frame)))
    return worst


def ranks_agree(model: torch.nn.Module, stiefel_factor: str) -> bool:
    """Whether every rank holds the same factors (compares a checksum across ranks)."""
    if not dist.is_initialized():
        return True
    values = []
    for _, param in constrained_parameters(model, stiefel_factor):
        whole = param.full_tensor() if hasattr(param, "full_tensor") else param
        values.append(whole.detach().double().sum())
    checksum = torch.stack(values).sum().reshape(1)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(low == high)


def main() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--stiefel-factor", choices=("B", "A"), default="B")
    args = parser.parse_args()

    from accelerate import Accelerator

    # reads the torchrun / accelerate launch environment; without CUDA accelerate needs cpu=True
    # to start a (gloo) process group
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world_size = accelerator.process_index, accelerator.num_processes
    model = tiny_model().to(accelerator.device)
    calibration = rule_batches(2, args.batch_size, seed=1000 + rank)  # this rank's own shard
    model = apply_fora(model, budget=0.5, calibration=calibration, r=4,
                       stiefel_factor=args.stiefel_factor, lora_dropout=0.0)  # fmt: skip
    selected = model.fora_report.selected_blocks

    if args.fsdp:
        shard_model(model, args.stiefel_factor)
        optimizer = fora_optimizer(model, stiefel_lr=2e-2, lr=2e-3)  # ShardedStiefelAdam
        trained = model
    else:
        optimizer = fora_optimizer(model, stiefel_lr=2e-2, lr=2e-3)
        trained, optimizer = accelerator.prepare(model, optimizer)  # DDP when world_size > 1

    losses = []
    for batch in rule_batches(args.steps, args.batch_size, seed=rank):
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        loss = trained(**batch).loss
        if args.fsdp:
            loss.backward()
        else:
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    error = worst_orthogonality(model, args.stiefel_factor)
    agree = ranks_agree(model, args.stiefel_factor)
    if rank == 0:
        mode = "fsdp2" if args.fsdp else "ddp"
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        print(f"{mode}, {world_size} process(es), optimizer {type(inner).__name__}, "
              f"blocks {selected}")  # fmt: skip
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; largest ||x^T x - I|| = {error:.2e}; "
              f"ranks agree: {agree}")  # fmt: skip
    accelerator.end_training()
    return trained, optimizer  # kept alive until os._exit below (see there)


if __name__ == "__main__":
    resources = main()
    # Skip the interpreter's teardown: in torch 2.13 the DDP reducer's destructor can join gloo's
    # worker thread while holding the GIL, and that thread needs the GIL to free its last tensors
    # (a deadlock seen in about half the CPU runs). Every rank has finished its work here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
