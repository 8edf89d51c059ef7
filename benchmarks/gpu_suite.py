"""The CUDA performance suite: optimizer step, training step, Fisher scoring, against targets.

    python benchmarks/gpu_suite.py                  # one CUDA device, under 5 minutes
    python benchmarks/gpu_suite.py --train-8b       # + the Llama-3.1-8B training step (opt-in)
    python benchmarks/gpu_suite.py --small          # tiny shapes; runs on CPU in about a minute

Parts (each one's failure is recorded and the others still run; the JSON is rewritten after
every part, to ``benchmarks/results/gpu_suite.json``, ``gpu_suite_small.json`` with ``--small``,
or ``--output``):

1. ``optimizer``: one step over the FoRA B-factors (q, k, v, up, down at r = 32 on half the
   blocks) of a TinyLlama-1.1B- and a Llama-3.1-8B-shaped model, fp32: StiefelAdam with each
   registered retraction vs torch AdamW (foreach) vs geoopt RiemannianAdam. On CUDA it also
   records, per optimizer, whether a steady-state step synchronises with the host
   (``torch.cuda.set_sync_debug_mode("error")``).
2. ``train_step``: one training step (forward, backward, optimizer), bf16 on CUDA, batch
   8 x 512, TinyLlama shape: FoRA (budget 0.5, r = 32, q,k,v,up,down; ``fora_optimizer``) vs
   peft LoRA on the same modules vs LoRA on all blocks vs DoRA on all blocks; time and peak
   memory above what is held before the step (``common.peak_bytes``).
3. ``fisher``: one calibration batch of each Fisher estimator vs one LoRA training step.

Timing: ``common.time_interleaved`` (round-robin over the methods, synchronize + perf_counter,
warm-up, medians); every timed round gets a new input set (random batch, or gradients for the
optimizer part). Models are built from configs with random weights. Builders are reused from
``optimizer_step.py``, ``train_step.py`` and ``fisher.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import geoopt
import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fisher as fisher_bench  # noqa: E402
import optimizer_step  # noqa: E402
import train_step  # noqa: E402
from common import RESULTS, environment, markdown_table, peak_bytes, time_interleaved, write_json  # noqa: E402

from stiefel_peft.fisher import ESTIMATORS, estimate_fisher  # noqa: E402
from stiefel_peft.fora import FoRAConfig  # noqa: E402

TARGETS = {  # name -> (limit, "<=" or ">=")
    "stiefel/adamw": (1.5, "<="),
    "geoopt/stiefel": (30.0, ">="),
    "fora/lora_same_blocks": (1.05, "<="),
    "fora/lora_all_blocks": (0.70, "<="),
    "fora/lora_same_blocks memory": (1.03, "<="),
    "fisher/lora_step": (1.0, "<="),
}
TRAIN_METHODS = ["fora", "lora_same_blocks", "lora_all_blocks", "dora_all_blocks"]


def plan(small: bool, device: str) -> dict:
    """Sizes of every part: ``--small`` (tiny shapes, any device) or the full CUDA set."""
    if small:
        return dict(
            optimizer_shapes=["tiny"],
            optimizer_repeats=5,
            optimizer_steps=2,
            input_sets=3,
            train_shape="tiny",
            train_dtype=torch.float32,
            batch=(2, 32),
            train_repeats=3,
            fisher_batch=(2, 32),
            fisher_repeats=3,
        )
    return dict(
        optimizer_shapes=["tinyllama-1.1b", "llama-3.1-8b"],
        optimizer_repeats=15,
        optimizer_steps=5,
        input_sets=3,
        train_shape="tinyllama-1.1b",
        train_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        batch=(8, 512),
        train_repeats=8,
        fisher_batch=(8, 512),
        fisher_repeats=5,
    )


def config_of(shape: str) -> dict:
    return train_step.SHAPES[shape]


def fora_b_factors(shape: str, rank: int = 32) -> list[tuple[int, int]]:
    """``(d_out, r)`` of lora_B for q, k, v, up, down on half the blocks of a Llama shape."""
    config = config_of(shape)
    hidden = config["hidden_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    rows = (hidden, kv, kv, config["intermediate_size"], hidden)  # q, k, v, up, down
    return [(n, rank) for _ in range(config["num_hidden_layers"] // 2) for n in rows]


def status(value: float, key: str) -> str:
    limit, comparison = TARGETS[key]
    ok = value <= limit if comparison == "<=" else value >= limit
    return "PASS" if ok else "MISS"


def target_row(label: str, key: str, value: float) -> dict:
    limit, comparison = TARGETS[key]
    return {
        "target": label,
        "value": value,
        "limit": f"{comparison} {limit}",
        "status": status(value, key),
    }


def host_sync_check(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, str]:
    """CUDA only: 'none' or the first line of the error a steady-state step raises when
    ``torch.cuda.set_sync_debug_mode("error")`` is on."""
    found = {}
    for kind, optimizer in optimizers.items():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
            found[kind] = "none"
        except RuntimeError as error:
            found[kind] = "syncs: " + str(error).splitlines()[0][:200]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return found


def optimizer_part(sizes: dict, device: str, default: str) -> dict:
    kinds = optimizer_step.optimizer_kinds()
    results, ratios, targets = [], {}, []
    steps = sizes["optimizer_steps"]
    for shape in sizes["optimizer_shapes"]:
        factors = fora_b_factors(shape)
        points, _ = optimizer_step.make_parameters(factors, torch.device(device))
        grad_sets = [
            optimizer_step.make_parameters(factors, torch.device(device), seed=s)[1]
            for s in range(1, 1 + sizes["input_sets"])
        ]
        optimizers = {kind: optimizer_step.build(kind, points, grad_sets[0]) for kind in kinds}
        per_kind = {kind: [[g.clone() for g in grads] for grads in grad_sets] for kind in kinds}

        def before_round(index: int, optimizers=optimizers, per_kind=per_kind) -> None:
            for kind, optimizer in optimizers.items():
                grads = per_kind[kind][index % len(per_kind[kind])]
                for param, grad in zip(optimizer.param_groups[0]["params"], grads, strict=True):
                    param.grad = grad

        def repeated(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
            def run() -> None:
                for _ in range(steps):
                    optimizer.step()

            return run

        seconds = time_interleaved(
            {k: repeated(o) for k, o in optimizers.items()},
            device,
            repeats=sizes["optimizer_repeats"],
            warmup=1,
            before_round=before_round,
        )
        ms = {kind: 1e3 * value / steps for kind, value in seconds.items()}
        syncs = host_sync_check(optimizers) if device == "cuda" else {}
        rows = {
            kind: {
                "ms": ms[kind],
                "ratio_vs_adamw": ms[kind] / ms["adamw"],
                "speedup_vs_geoopt": ms["geoopt"] / ms[kind],
                "host_sync": syncs.get(kind),
            }
            for kind in kinds
        }
        results.append({"shape": shape, "factors": len(factors), "rows": rows})
        stiefel = f"stiefel-{default}"
        ratios[f"{shape}: {stiefel}/adamw"] = rows[stiefel]["ratio_vs_adamw"]
        ratios[f"{shape}: geoopt/{stiefel}"] = rows[stiefel]["speedup_vs_geoopt"]
        targets.append(
            target_row(
                f"optimizer {shape}: StiefelAdam({default}) / AdamW",
                "stiefel/adamw",
                rows[stiefel]["ratio_vs_adamw"],
            )
        )
        targets.append(
            target_row(
                f"optimizer {shape}: geoopt / StiefelAdam({default})",
                "geoopt/stiefel",
                rows[stiefel]["speedup_vs_geoopt"],
            )
        )
        print(
            f"\noptimizer step, {shape} FoRA B-factors ({len(factors)}), fp32, {device}, "
            f"{steps} steps x {sizes['optimizer_repeats']} rounds (median ms per step)"
        )
        print(
            markdown_table(
                ["optimizer", "ms / step", "/ AdamW", "geoopt / this", "host sync"],
                [
                    [
                        k,
                        f"{r['ms']:.3f}",
                        f"{r['ratio_vs_adamw']:.2f}",
                        f"{r['speedup_vs_geoopt']:.1f}",
                        r["host_sync"] or "n/a (CPU)",
                    ]
                    for k, r in rows.items()
                ],
            )
        )
        del optimizers, per_kind, points, grad_sets
        release(device)
    return {"results": results, "ratios": ratios, "targets": targets}


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def train_case(
    shape: str,
    dtype: torch.dtype,
    device: str,
    batch: tuple[int, int],
    repeats: int,
    input_sets: int,
    sequential: bool,
) -> dict:
    """Time and peak memory of each training method; ``sequential`` builds one model at a time
    (for shapes whose four models do not fit together; then the runs are not interleaved)."""
    vocab = config_of(shape)["vocab_size"]
    batches = [
        train_step.make_batch(vocab, *batch, device, seed=100 + s) for s in range(input_sets)
    ]
    current = dict(batches[0])  # every step closure reads this dict; swapped before each round

    def before_round(index: int) -> None:
        current.update(batches[index % len(batches)])

    groups = [[name] for name in TRAIN_METHODS] if sequential else [TRAIN_METHODS]
    rows, info = {}, {}
    for which in groups:
        steps, info = train_step.methods(shape, dtype, device, current, which)
        seconds = time_interleaved(
            steps, device, repeats=repeats, warmup=2, before_round=before_round
        )
        for name, step in steps.items():
            rows[name] = {"ms": 1e3 * seconds[name], "peak_gib": peak_bytes(step, device) / 2**30}
        del steps
        release(device)
    ratios = {}
    for other in TRAIN_METHODS[1:]:
        ratios[f"fora/{other}"] = rows["fora"]["ms"] / rows[other]["ms"]
        ratios[f"fora/{other} memory"] = rows["fora"]["peak_gib"] / rows[other]["peak_gib"]
    print(
        f"\ntraining step, {shape} {dtype} on {device}, batch {batch[0]} x {batch[1]}, "
        f"{repeats} rounds{' (sequential)' if sequential else ''}; FoRA blocks "
        f"{info['selected_blocks']}"
    )
    print(
        markdown_table(
            ["method", "ms / step", "peak GiB above held"],
            [[n, f"{r['ms']:.1f}", f"{r['peak_gib']:.3f}"] for n, r in rows.items()],
        )
    )
    return {
        "shape": shape,
        "dtype": str(dtype),
        "device": device,
        "batch": list(batch),
        "sequential": sequential,
        "rows": rows,
        "ratios": ratios,
        **info,
    }


def train_part(sizes: dict, device: str, with_8b: bool, deadline: float) -> dict:
    results = [
        train_case(
            sizes["train_shape"],
            sizes["train_dtype"],
            device,
            sizes["batch"],
            sizes["train_repeats"],
            sizes["input_sets"],
            sequential=False,
        )
    ]
    skipped = []
    if with_8b:
        if time.monotonic() + 120 < deadline:
            results.append(
                train_case(
                    "llama-3.1-8b",
                    sizes["train_dtype"],
                    device,
                    sizes["batch"],
                    3,
                    sizes["input_sets"],
                    sequential=True,
                )
            )
        else:
            skipped.append("llama-3.1-8b: less than 120 s of the time budget left")
    targets = []
    for result in results:
        for key in (
            "fora/lora_same_blocks",
            "fora/lora_all_blocks",
            "fora/lora_same_blocks memory",
        ):
            targets.append(
                target_row(f"train {result['shape']}: {key}", key, result["ratios"][key])
            )
    ratios = {f"{r['shape']}: {k}": v for r in results for k, v in r["ratios"].items()}
    return {"results": results, "ratios": ratios, "targets": targets, "skipped": skipped}


def fisher_part(sizes: dict, device: str, default: str) -> dict:
    shape, dtype = sizes["train_shape"], sizes["train_dtype"]
    config = {**config_of(shape), "max_position_embeddings": 4096}
    batches = [
        fisher_bench.make_batch(config["vocab_size"], *sizes["fisher_batch"], device, seed=200 + s)
        for s in range(sizes["input_sets"])
    ]
    current = dict(batches[0])

    def before_round(index: int) -> None:
        current.update(batches[index % len(batches)])

    model = fisher_bench.build(config, dtype, device)
    methods = {"lora_step": fisher_bench.lora_step_fn(config, dtype, device, current)}
    for estimator in ESTIMATORS:
        methods[estimator] = lambda e=estimator: estimate_fisher(model, [current], e)
    seconds = time_interleaved(
        methods, device, repeats=sizes["fisher_repeats"], warmup=1, before_round=before_round
    )
    rows = {
        name: {"ms": 1e3 * seconds[name], "peak_gib": peak_bytes(fn, device) / 2**30}
        for name, fn in methods.items()
    }
    base = rows["lora_step"]
    ratios = {}
    for name, row in rows.items():
        row["time_ratio"], row["memory_ratio"] = (
            row["ms"] / base["ms"],
            row["peak_gib"] / base["peak_gib"],
        )
        if name != "lora_step":
            ratios[f"{name}/lora_step"] = row["time_ratio"]
            ratios[f"{name}/lora_step memory"] = row["memory_ratio"]
    targets = [
        target_row(
            f"fisher {shape}: {default} / LoRA step",
            "fisher/lora_step",
            ratios[f"{default}/lora_step"],
        )
    ]
    print(
        f"\nFisher scoring per batch vs one LoRA step (all blocks), {shape} {dtype} on {device}, "
        f"batch {sizes['fisher_batch'][0]} x {sizes['fisher_batch'][1]}"
    )
    print(
        markdown_table(
            ["method", "ms / batch", "x LoRA step", "peak GiB above held", "x LoRA step"],
            [
                [
                    n,
                    f"{r['ms']:.1f}",
                    f"{r['time_ratio']:.2f}",
                    f"{r['peak_gib']:.3f}",
                    f"{r['memory_ratio']:.2f}",
                ]
                for n, r in rows.items()
            ],
        )
    )
    return {
        "shape": shape,
        "dtype": str(dtype),
        "batch": list(sizes["fisher_batch"]),
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU: about a minute)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="optimizer,train_step,fisher")
    parser.add_argument(
        "--train-8b",
        action="store_true",
        help="also the Llama-3.1-8B training step (one model at a time)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=280.0,
        help="wall-clock budget; optional cases are skipped when it runs out",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: 1 on CPU)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="default: benchmarks/results/gpu_suite[_small].json",
    )
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = RESULTS / ("gpu_suite_small.json" if args.small else "gpu_suite.json")
    device = torch.device(args.device).type
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device; pass --device cpu --small")
    torch.set_num_threads(args.threads or (1 if device == "cpu" else torch.get_num_threads()))
    start = time.monotonic()
    deadline = start + args.budget_s
    sizes = plan(args.small, device)
    default = FoRAConfig().retraction
    report: dict = {
        "command": "python benchmarks/gpu_suite.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": {
            **environment(args.device),
            "geoopt": geoopt.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "small": args.small,
        "default_retraction": default,
        "errors": {},
        "seconds": {},
    }
    parts = {
        "optimizer": lambda: optimizer_part(sizes, device, default),
        "train_step": lambda: train_part(sizes, device, args.train_8b, deadline),
        "fisher": lambda: fisher_part(sizes, device, FoRAConfig().estimator),
    }
    for name in args.parts.split(","):
        part_start = time.monotonic()
        try:
            report[name] = parts[name]()
        except Exception as error:  # one part's failure must not lose the others' numbers
            report["errors"][name] = "".join(traceback.format_exception(error))[-4000:]
            print(f"\n{name} FAILED: {error!r}", file=sys.stderr)
        release(device)  # free the part's models before the next one
        report["seconds"][name] = time.monotonic() - part_start
        report["seconds"]["total"] = time.monotonic() - start
        write_json_to(args.output, report)
    targets = [row for name in parts if name in report for row in report[name]["targets"]]
    report["targets"] = targets
    write_json_to(args.output, report)
    print(
        f"\ntargets ({'--small shapes: ratios are not the CUDA figures' if args.small else device})"
    )
    print(
        markdown_table(
            ["target", "measured", "limit", "status"],
            [[t["target"], f"{t['value']:.3f}", t["limit"], t["status"]] for t in targets],
        )
    )
    print(f"\n{time.monotonic() - start:.0f} s in all; wrote {args.output}")
    return 1 if report["errors"] else 0


def write_json_to(path: Path, payload: dict) -> None:
    if path.parent == RESULTS:
        write_json(path.stem, payload)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
