"""Train a TRM on the synthetic in-context task suite, then report per task: zero-shot, in-context and
task-vector accuracy (the vector injected once, at the same call of every later supervision step, and
added as a relative vector; call and scale chosen per task by first-token accuracy on a dev set), and
the share of in-context accuracy that the task vectors recover (test answers generated in full).

    python scripts/task_vectors.py --minutes 10 --out runs/task_vectors   # cuda when present, else cpu
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch

from trm_fast.checkpoint import load_checkpoint, read_checkpoint
from trm_fast.data import ByteTokenizer, TokenDataset
from trm_fast.presets import create_model
from trm_fast.task_vectors import (TASKS, build_prompt, extract_task_vectors, greedy_answers, modulated_generate,
                                   select_layer, task_item, training_texts)
from trm_fast.training import TrainConfig, evaluate, train


def accuracy(answers, items):
    return sum(a == item["answer"] for a, item in zip(answers, items)) / len(items)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--train-lines", type=int, default=200_000)
    parser.add_argument("--dev", type=int, default=200, help="dev items per task (layer and scale selection)")
    parser.add_argument("--test", type=int, default=100, help="test items per task")
    parser.add_argument("--demos", type=int, default=4)
    parser.add_argument("--alt-queries", type=int, default=4, help="alternative queries a task vector averages over")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="runs/task_vectors")
    parser.add_argument("--checkpoint", help="evaluate this trained model (its EMA weights) instead of training one")
    parser.add_argument("--add-scales", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0, 4.0],
                        help="scales tried (on the dev set) for the added relative vectors")
    parser.add_argument("--seed", type=int, default=0, help="initialization and data order of the trained model")
    parser.add_argument("--train-only", action="store_true",
                        help="stop after training (evaluate the checkpoint later with --checkpoint)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    data = TokenDataset(training_texts(args.train_lines, seed=0), tokenizer, 48)
    train_set, val_set = data.split(0.02)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, map_location=device, use_ema=True)
        result = {"step": read_checkpoint(args.checkpoint)["step"], "val_loss": evaluate(model, val_set, 64)["loss"]}
    else:
        torch.manual_seed(args.seed)
        model = create_model(args.preset, vocab_size=tokenizer.vocab_size, max_seq_len=48, dropout=0.0,
                             eos_token_id=tokenizer.eos_id).to(device)
        config = TrainConfig(batch_size=args.batch_size, lr=1e-3, warmup_steps=200, minutes=args.minutes,
                             eval_every=500, eval_batches=10, log_every=50, seed=args.seed)
        result = train(model, train_set, val_set, config, out_dir=args.out)
        if args.train_only:
            return
    model.eval()

    rng = random.Random(1)
    rows = {}
    for task in sorted(TASKS):
        dev = [task_item(task, rng, args.demos, args.alt_queries) for _ in range(args.dev)]
        test = [task_item(task, rng, args.demos, args.alt_queries) for _ in range(args.test)]
        start = time.perf_counter()
        n = args.alt_queries
        layer, layer_accuracies = select_layer(model, tokenizer, dev, n)
        every_layer, every_accuracies = select_layer(model, tokenizer, dev, n, every_step=True)
        dev_relative = extract_task_vectors(model, tokenizer, [d["demos"] for d in dev], [d["alt_queries"] for d in dev],
                                            n, relative=True)
        added = {scale: select_layer(model, tokenizer, dev, mode="add", scale=scale, vectors=dev_relative)
                 for scale in args.add_scales}
        add_scale = max(added, key=lambda scale: max(added[scale][1]))
        add_layer = added[add_scale][0]
        demos, alt_queries = [t["demos"] for t in test], [t["alt_queries"] for t in test]
        vectors = extract_task_vectors(model, tokenizer, demos, alt_queries, n)
        relative = extract_task_vectors(model, tokenizer, demos, alt_queries, n, relative=True)
        queries = [t["query"] for t in test]
        rows[task] = {
            "zero_shot": accuracy(greedy_answers(model, tokenizer, [build_prompt([], t["query"]) for t in test]), test),
            "in_context": accuracy(greedy_answers(model, tokenizer, [build_prompt(t["demos"], t["query"])
                                                                      for t in test]), test),
            "task_vector": accuracy(modulated_generate(model, tokenizer, queries, vectors[:, layer], layer), test),
            "task_vector_every_step": accuracy(modulated_generate(model, tokenizer, queries, vectors[:, every_layer],
                                                                  every_layer, every_step=True), test),
            "task_vector_add": accuracy(modulated_generate(model, tokenizer, queries, relative[:, add_layer], add_layer,
                                                           mode="add", scale=add_scale), test),
            "layer": layer, "dev_accuracy_per_layer": layer_accuracies, "layer_every_step": every_layer,
            "dev_accuracy_per_layer_every_step": every_accuracies, "layer_add": add_layer, "scale_add": add_scale,
            "dev_accuracy_per_layer_add": {str(scale): accs for scale, (_, accs) in added.items()},
            "seconds": time.perf_counter() - start}
        print(f"{task:<14} zero-shot {rows[task]['zero_shot']:.2f}  in-context {rows[task]['in_context']:.2f}  "
              f"task vector {rows[task]['task_vector']:.2f} (layer {layer}), injected every step "
              f"{rows[task]['task_vector_every_step']:.2f} (layer {every_layer}), added "
              f"{rows[task]['task_vector_add']:.2f} (layer {add_layer}, scale {add_scale:g})", flush=True)
    icl = sum(r["in_context"] for r in rows.values()) / len(rows)
    tv, tv_every, tv_add = (sum(r[key] for r in rows.values()) / len(rows)
                            for key in ("task_vector", "task_vector_every_step", "task_vector_add"))
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "preset": None if args.checkpoint else args.preset,
               "model": {k: getattr(model.config, k) for k in ("d_model", "n_heads", "supervision_steps",
                                                               "deep_steps", "latent_steps")},
               "checkpoint": args.checkpoint, "train_steps": result["step"],
               "train_minutes": None if args.checkpoint else args.minutes, "val_loss": result["val_loss"],
               "dev_items": args.dev, "test_items": args.test, "alt_queries": args.alt_queries,
               "add_scales": args.add_scales,
               "mean_zero_shot": sum(r["zero_shot"] for r in rows.values()) / len(rows), "mean_in_context": icl,
               "mean_task_vector": tv, "recovered": tv / icl if icl else None,
               "mean_task_vector_every_step": tv_every, "recovered_every_step": tv_every / icl if icl else None,
               "mean_task_vector_add": tv_add, "recovered_add": tv_add / icl if icl else None, "tasks": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "task_vectors.json").write_text(json.dumps(summary, indent=2))
    print(f"mean: zero-shot {summary['mean_zero_shot']:.3f}, in-context {icl:.3f}, task vector {tv:.3f}, "
          f"recovered {summary['recovered']}; injected every step: {tv_every:.3f}, recovered "
          f"{summary['recovered_every_step']}; added: {tv_add:.3f}, recovered {summary['recovered_add']}")


if __name__ == "__main__":
    main()
