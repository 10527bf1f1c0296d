"""Issue 4's numbers: token-level early exit at the threshold calibrated to `hard_ratio`, against the same
model without exit, on held-out text.

Reports the forward time with and without exit (median wall time of a synchronized call, B x L from the
validation split): without exit, the same compacted run with every token to the last step
(`EarlyExit(1.0, min_steps=steps)`); both on the torch and on the Triton TinyNet ops, with GPU time per step
at 1, 1/2, 1/4 and 1/8 of the rows, the speed-up taken as the faster no-exit run over the faster exit run;
and, for reference, the model's plain forward eagerly and as one CUDA
graph; the ideal speed-up 1 / compute_cost and the share of it realized; validation perplexity with and
without exit (and with the exit steps' logits but no frozen states, which tells the two causes of the gap
apart); the routing piece (confidence + route_rows, a graph replay) against one supervision
step (a graph replay), both by CUDA events over back-to-back replays; the same for other criteria and
minimum steps; and whether the CPU gives the CUDA results (ops bit for bit; the early-exit forward in fp32).

    python scripts/early_exit_bench.py --checkpoint runs/ee/best.pt --data tinyshakespeare.txt --out ee.json
"""
import argparse
import json

import torch

from trm_fast import cuda_graphs
from trm_fast.checkpoint import load_checkpoint
from trm_fast.data import ByteTokenizer, TokenDataset, dataset_batches, read_texts
from trm_fast.early_exit import (EarlyExit, _run_for, calibrate_threshold, compacted_early_exit, evaluate_early_exit,
                                 states_after)
from trm_fast.ops import gather_rows, route_rows, route_tokens, scatter_rows
from trm_fast.training import evaluate

from profiling import events_ms, kernel_times, median_ms


@torch.no_grad()
def no_exit_logits(model, ids, mask, steps):
    return model._output_logits(states_after(model, ids, mask, steps))


def loaded_run(model, ids, mask):
    """The model's early-exit run for this batch shape, loaded with the batch (every valid token listed)."""
    run = _run_for(model, *ids.shape)
    run.take(ids, mask)
    run.load()
    return run


def plain_step(rows: int) -> tuple:
    """The graph key of `run.recurse(rows)`: a middle step of `rows` rows, no exits, no routing."""
    return ("step", rows, False, None, False)


def graphed(fn, device: torch.device):
    """`fn` (on fixed inputs) captured in a CUDA graph after a warm-up on a side stream: its replay (on the
    CPU: `fn`)."""
    return cuda_graphs.capture(fn).replay if device.type == "cuda" else fn


@torch.no_grad()
def ppl_exit_logits_unfrozen(model, val, config, batch_size, device):
    """Perplexity with each token's logits taken at its exit step, but from the plain forward (no state
    frozen): the share of the exit's perplexity cost that comes from earlier logits alone."""
    loss, tokens = 0.0, 0
    for batch in dataset_batches(val, batch_size):
        ids, targets, mask = (batch[k].to(device) for k in ("input_ids", "target_ids", "attention_mask"))
        exit_step = compacted_early_exit(model, ids, config, mask)["exit_step"]
        per_step = torch.stack(model(ids, mask)["all_logits"])  # [steps, B, L, V]
        logits = per_step.gather(0, (exit_step.clamp(min=1) - 1)[None, ..., None].expand(1, *per_step.shape[1:]))[0]
        valid = mask.bool()
        loss += float(torch.nn.functional.cross_entropy(logits[valid].float(), targets[valid], reduction="sum"))
        tokens += int(valid.sum())
    return float(torch.tensor(loss / tokens).exp())


def cpu_equals_cuda(checkpoint, ids, mask, config):
    """The early-exit forward and each routing op on the CPU and on CUDA (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cuda_model, cpu_model = (load_checkpoint(checkpoint, map_location=d, use_ema=True).eval() for d in ("cuda", "cpu"))
    gpu = compacted_early_exit(cuda_model, ids, config, mask)
    cpu = compacted_early_exit(cpu_model, ids.cpu(), config, mask.cpu())
    same_step = gpu["exit_step"].cpu() == cpu["exit_step"]
    both = same_step & mask.cpu().bool()
    logits_diff = (gpu["logits"].cpu()[both] - cpu["logits"][both]).abs().max().item()
    generator = torch.Generator().manual_seed(0)
    confidence = torch.rand(ids.numel(), generator=generator)
    active = torch.rand(ids.numel(), generator=generator) < 0.7
    routed = [route_tokens(confidence.to(d), active.to(d), 0.5) for d in ("cpu", "cuda")]
    rows = routed[0][1][: int(routed[0][2][1])]
    listed = [(confidence[:rows.numel()].to(d), rows.clone().to(d), torch.zeros_like(rows, device=d),
               torch.zeros(ids.numel(), dtype=torch.long, device=d), torch.zeros(2, dtype=torch.long, device=d),
               torch.tensor(2, device=d)) for d in ("cpu", "cuda")]
    for args in listed:
        route_rows(*args, 0.5)
    table = torch.randn(ids.numel(), cpu_model.config.d_model, generator=generator)
    gathered = [gather_rows(table.to(d), rows.to(d)) for d in ("cpu", "cuda")]
    scattered = [torch.zeros_like(table, device=d) for d in ("cpu", "cuda")]
    for out, d in zip(scattered, ("cpu", "cuda")):
        scatter_rows(out, rows.to(d), gathered[0].to(d))
    return {"exit_step_equal_fraction": same_step.float().mean().item(),
            "exit_counts_cpu": cpu["exit_counts"], "exit_counts_cuda": gpu["exit_counts"],
            "max_abs_logit_diff_same_exit": logits_diff,
            "route_tokens_equal": all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(*routed)),
            "route_rows_equal": all(torch.equal(a, b.cpu()) for a, b in zip(*listed)),
            "gather_rows_equal": torch.equal(gathered[0], gathered[1].cpu()),
            "scatter_rows_equal": torch.equal(scattered[0], scattered[1].cpu())}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="the text the model was trained on (its tail is validation)")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hard-ratio", type=float, default=0.5)
    parser.add_argument("--criterion", default="max_prob")
    parser.add_argument("--min-steps", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="early_exit.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the forward times with and without exit (a quick re-measurement)")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = load_checkpoint(args.checkpoint, map_location=device, use_ema=True).eval()
    model.to(getattr(torch, args.dtype))
    steps = model.config.supervision_steps
    _, val = TokenDataset(read_texts(args.data), ByteTokenizer(), args.seq_len, pack=True).split(args.val_fraction)
    batches = [(b["input_ids"].to(device), b["attention_mask"].to(device)) for b in dataset_batches(val, args.batch_size)]
    threshold = calibrate_threshold(model, batches, args.hard_ratio, args.criterion, exit_step=args.min_steps)
    config = EarlyExit(threshold, args.criterion, args.min_steps)
    ids, mask = batches[0]
    B, L = ids.shape

    exit_out = compacted_early_exit(model, ids, config, mask)
    no_exit = EarlyExit(1.0, args.criterion, min_steps=steps)  # every token to the last step, same run
    rows = B * L
    by_ops = {}
    for kernels in ("torch", "triton"):  # the compacted run's TinyNet ops (the model's `kernels` choice)
        model.tiny_net.kernels = kernels
        run = loaded_run(model, ids, mask)
        by_ops[kernels] = {
            "ms_no_exit": median_ms(lambda: compacted_early_exit(model, ids, no_exit, mask), args.repeats, device),
            "ms_early_exit": median_ms(lambda: compacted_early_exit(model, ids, config, mask), args.repeats, device)}
        if args.timing_only:
            continue
        by_ops[kernels]["ms_step_gpu_by_rows"] = {
            n: events_ms(lambda: run.launch(plain_step(n), lambda: run.recurse(n)), args.repeats, device)
            for n in (rows, rows // 2, rows // 4, rows // 8)}
        if device.type == "cuda":  # where a step's time goes, at all rows and at 1/8
            by_ops[kernels]["step_kernels_by_rows"] = {}
            for n in (rows, rows // 8):
                count, busy_us, by_name, calls = kernel_times(run.graphs[plain_step(n)].replay)
                by_ops[kernels]["step_kernels_by_rows"][n] = {
                    "kernels": count, "busy_us": busy_us,
                    "heaviest_us": {f"{name} ({calls[name]}x)": t for name, t in by_name.most_common(12)}}
        print(f"TinyNet ops {kernels}: {json.dumps(by_ops[kernels])}", flush=True)
    t_plain = min(v["ms_no_exit"] for v in by_ops.values())  # the faster of each, against each other
    fastest = min(by_ops, key=lambda k: by_ops[k]["ms_early_exit"])
    t_exit = by_ops[fastest]["ms_early_exit"]
    timing = {"min_steps": args.min_steps, "exit_counts": exit_out["exit_counts"], "ms_no_exit": t_plain,
              "ms_early_exit": t_exit, "realized_fraction_of_ideal": t_plain / t_exit * exit_out["compute_cost"]}
    if args.timing_only:
        print(json.dumps(timing))
        return
    model.tiny_net.kernels = fastest
    t_eager = median_ms(lambda: no_exit_logits(model, ids, mask, steps), args.repeats, device)
    t_graph = median_ms(graphed(lambda: no_exit_logits(model, ids, mask, steps), device), args.repeats, device)
    t_forward = median_ms(lambda: model(ids, mask), args.repeats, device)

    run = loaded_run(model, ids, mask)
    t_step = by_ops[fastest]["ms_step_gpu_by_rows"][rows]
    y = gather_rows(run.y, run.rows[:rows])  # (each replay routes the rows the last one left listed: same work)
    t_routing = events_ms(lambda: run.launch(("routing", rows, threshold, args.criterion), lambda: run.route(
        run.rows[:rows], y, threshold, args.criterion)), args.repeats, device)
    ideal = 1.0 / exit_out["compute_cost"]
    speedup = t_plain / t_exit
    ppl_plain = evaluate(model, val, args.batch_size)["ppl"]  # the final step's logits, no exit
    quality = evaluate_early_exit(model, val, config, args.batch_size)
    variants = {}
    for criterion in ("max_prob", "q_head"):
        for min_steps in (1, 2):
            t = calibrate_threshold(model, batches, args.hard_ratio, criterion, exit_step=min_steps)
            variant = EarlyExit(t, criterion, min_steps)
            out = compacted_early_exit(model, ids, variant, mask)
            ms = median_ms(lambda: compacted_early_exit(model, ids, variant, mask), args.repeats, device)
            q = evaluate_early_exit(model, val, variant, args.batch_size)
            variants[f"{criterion}, min_steps {min_steps}"] = {
                "threshold": t, "exit_counts": out["exit_counts"], "ms": ms, "speedup": t_plain / ms,
                "ideal_speedup": 1.0 / out["compute_cost"],
                "realized_fraction_of_ideal": t_plain / ms * out["compute_cost"],
                "val": q, "ppl_ratio": q["ppl"] / ppl_plain}
            print(f"{criterion}, min_steps {min_steps}: {json.dumps(variants[f'{criterion}, min_steps {min_steps}'])}",
                  flush=True)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "dtype": args.dtype,
        "checkpoint_config": model.config.to_dict(), "batch": list(ids.shape), "hard_ratio": args.hard_ratio,
        "criterion": args.criterion, "min_steps": args.min_steps, "threshold": threshold,
        "exit_counts": exit_out["exit_counts"], "shallow_ratio": exit_out["shallow_ratio"],
        "compute_cost": exit_out["compute_cost"], "ms_no_exit": t_plain, "ms_early_exit": t_exit,
        "early_exit_tinynet_ops": fastest, "by_tinynet_ops": by_ops,
        "ms_no_exit_plain_forward_eager": t_eager, "ms_no_exit_plain_forward_cuda_graph": t_graph,
        "ms_model_forward_all_step_logits": t_forward, "speedup": speedup,
        "speedup_over_plain_forward_cuda_graph": t_graph / t_exit, "ideal_speedup": ideal,
        "realized_fraction_of_ideal": speedup / ideal, "ms_routing_gpu": t_routing, "ms_step_gpu": t_step,
        "routing_fraction_of_step": t_routing / t_step,
        "val_ppl_no_exit": ppl_plain, "val": quality, "ppl_ratio": quality["ppl"] / ppl_plain,
        "val_ppl_exit_logits_unfrozen": ppl_exit_logits_unfrozen(model, val, config, args.batch_size, device),
        "variants": variants,
        "cpu_vs_cuda": cpu_equals_cuda(args.checkpoint, ids[:4], mask[:4], config) if device.type == "cuda" else None}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "checkpoint_config"}, indent=2))


if __name__ == "__main__":
    main()
