"""Fisher estimators vs one peft LoRA training step: time and peak memory per calibration batch.

    python benchmarks/fisher.py --quick          # SmolLM2-135M shape, CPU, a few repeats
    python benchmarks/fisher.py                  # + larger batch; TinyLlama-1.1B bf16 on CUDA
    python benchmarks/fisher.py --real           # + ranking stability on the real SmolLM2-135M

Models are built from a config with random weights (speed and memory do not depend on the
values). Per shape: one base model for the estimators and an identical second model wrapped by
peft (LoRA r=32, alpha=64 on q,k,v,up,down; AdamW lr 2e-4) for the training step, both fed the
same batch. Runs are interleaved (every method once per round), times are medians over rounds.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the call;
on CPU the tensor-allocator timeline of one profiled call (``torch.profiler`` with
``profile_memory=True``: each op's net self allocation at its start, frees as they happen), whose
running maximum is the peak above the memory held before the call (weights excluded). Python
objects and allocator caching are not counted; the same rule is applied to every method.

Times: wall clock and this process's CPU time (``time.process_time``), the latter being less
sensitive to other jobs on shared cores. Writes ``benchmarks/results/fisher.json`` (with
torch/transformers/peft versions, CPU count, device) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_bytes, synchronize  # noqa: E402

from stiefel_peft.fisher import ESTIMATORS, estimate_fisher  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fisher.json"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]

SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
)
TINYLLAMA_SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
    max_position_embeddings=2048,
)


def shape_set(quick: bool, device: str) -> list[dict]:
    if device == "cuda":
        return [dict(name="tinyllama-1.1b", config=TINYLLAMA_SHAPE, dtype=torch.bfloat16,
                     batch=4, seq_len=512, rounds=5)]
    shapes = [dict(name="smollm2-135m", config=SMOLLM2_SHAPE, dtype=torch.float32,
                   batch=4, seq_len=128, rounds=5)]
    if not quick:
        shapes.append(dict(name="smollm2-135m", config=SMOLLM2_SHAPE, dtype=torch.float32,
                           batch=8, seq_len=256, rounds=3))
    return shapes


def build(config: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1.1B CPU init takes many seconds
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    return model.to(dtype=dtype).eval()


def make_batch(vocab: int, batch: int, seq_len: int, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1::2, -seq_len // 4 :] = 0  # a quarter padding on odd rows
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {k: v.to(device) for k, v in
            dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels).items()}


def lora_step_fn(config: dict, dtype: torch.dtype, device: str, batch: dict):
    model = build(config, dtype, device)
    lora = peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(model, lora).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_shape(shape: dict, device: str, estimators: list[str]) -> dict:
    config, dtype = shape["config"], shape["dtype"]
    batch = make_batch(config["vocab_size"], shape["batch"], shape["seq_len"], device)
    model = build(config, dtype, device)
    methods = {"lora_step": lora_step_fn(config, dtype, device, batch)}
    for estimator in estimators:
        methods[estimator] = (lambda e=estimator: estimate_fisher(model, [batch], e))
    for fn in methods.values():  # warm-up (AdamW state, allocator, kernels)
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu_times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(shape["rounds"]):
        for name, fn in methods.items():
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    rows = {}
    for name, fn in methods.items():
        rows[name] = {"seconds": statistics.median(times[name]), "all_seconds": times[name],
                      "cpu_seconds": statistics.median(cpu_times[name]),
                      "all_cpu_seconds": cpu_times[name], "peak_bytes": peak_bytes(fn, device)}
    base = rows["lora_step"]
    for row in rows.values():
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["cpu_time_ratio"] = row["cpu_seconds"] / base["cpu_seconds"]
        row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
    described = {k: (str(v) if k == "dtype" else v) for k, v in shape.items() if k != "config"}
    return {"shape": described,
            "config": config, "results": rows}


def print_table(result: dict) -> None:
    shape = result["shape"]
    print(f"\n{shape['name']} {shape['dtype']} batch {shape['batch']} x {shape['seq_len']} "
          f"({shape['rounds']} rounds, medians)")
    print("| method | wall s / batch | x LoRA | CPU s / batch | x LoRA | peak MiB | x LoRA |")
    print("|---|---|---|---|---|---|---|")
    for name, row in result["results"].items():
        print(f"| {name} | {row['seconds']:.2f} | {row['time_ratio']:.2f} | "
              f"{row['cpu_seconds']:.2f} | {row['cpu_time_ratio']:.2f} | "
              f"{row['peak_bytes'] / 2**20:.0f} | {row['memory_ratio']:.2f} |")


def spearman(first: dict[int, float], second: dict[int, float]) -> float:
    """Spearman rank correlation of two block -> score maps (average ranks on ties)."""
    keys = sorted(first)

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                result[order[position]] = (start + end) / 2
            start = end + 1
        return result

    a, b = ranks([first[k] for k in keys]), ranks([second[k] for k in keys])
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    norm = (sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b)) ** 0.5
    return covariance / norm if norm else float("nan")


def top_half_overlap(first: dict[int, float], second: dict[int, float]) -> float:
    """Fraction of FoRA's selection (top L/2 blocks) that two scorings share."""
    half = len(first) // 2
    top = [set(sorted(s, key=lambda k: -s[k])[:half]) for s in (first, second)]
    return len(top[0] & top[1]) / half


def ranking_stability(batch_size: int = 4, sizes: tuple[int, ...] = (16, 64, 128)) -> dict:
    """Block rankings on the real SmolLM2-135M with Rotten Tomatoes reviews as calibration text.

    Each example is ``"Review: <text>\nSentiment: <positive|negative>"`` with the LM loss on every
    token. Reports Spearman (and top-L/2 overlap) between the estimators at the largest size,
    and of the empirical Fisher across calibration sizes (against the largest).
    """
    from stiefel_peft.cli.assets import load_rotten_tomatoes, load_smollm2  # noqa: PLC0415

    model, tokenizer = load_smollm2()
    rows = load_rotten_tomatoes()[: max(sizes)]
    texts = [f"Review: {row['text']}\nSentiment: {'positive' if row['label'] else 'negative'}"
             for row in rows]
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt",
                            padding=True, truncation=True, max_length=96)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        batches.append({**encoded, "labels": labels})
    largest = max(sizes) // batch_size
    per_block, seconds = {}, {}
    for estimator in ESTIMATORS:
        scores = estimate_fisher(model, batches[:largest], estimator, progress=True)
        per_block[estimator], seconds[estimator] = scores.per_block, scores.seconds
    by_size = {}
    for size in sizes[:-1]:
        by_size[size] = estimate_fisher(model, batches[: size // batch_size]).per_block
    by_size[max(sizes)] = per_block["empirical"]
    between = {f"{a} vs {b}": {"spearman": spearman(per_block[a], per_block[b]),
                               "top_half_overlap": top_half_overlap(per_block[a], per_block[b])}
               for i, a in enumerate(list(ESTIMATORS)) for b in list(ESTIMATORS)[i + 1 :]}
    across = {f"empirical {size} vs {max(sizes)}": {
        "spearman": spearman(by_size[size], by_size[max(sizes)]),
        "top_half_overlap": top_half_overlap(by_size[size], by_size[max(sizes)])}
        for size in sizes[:-1]}
    print(f"\nranking stability, SmolLM2-135M, Rotten Tomatoes, batches of {batch_size}")
    print("| pair | Spearman | top-L/2 overlap |\n|---|---|---|")
    for pair, row in {**between, **across}.items():
        print(f"| {pair} | {row['spearman']:.3f} | {row['top_half_overlap']:.2f} |")
    return {"between_estimators": between, "across_sizes": across, "seconds": seconds,
            "per_block": per_block, "empirical_by_size": by_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", "--small", action="store_true", help="one shape (4 x 128)")
    parser.add_argument("--real", action="store_true", help="ranking stability on real SmolLM2")
    parser.add_argument("--estimators", nargs="*", default=list(ESTIMATORS))
    parser.add_argument("--no-speed", action="store_true", help="skip the speed part")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 avoids "
                             "oversubscription on cores shared with other jobs")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arguments = sys.argv[1:] if argv is None else argv
    report = {"command": "python benchmarks/fisher.py " + " ".join(arguments),
              "environment": environment(
                  device, {"transformers": transformers.__version__, "peft": peft.__version__}),
              "speed": []}
    for shape in [] if args.no_speed else shape_set(args.quick, device):
        result = bench_shape(shape, device, args.estimators)
        print_table(result)
        report["speed"].append(result)
    if args.real:
        report["ranking"] = ranking_stability()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
