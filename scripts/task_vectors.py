"""Train a TRM on the synthetic in-context task suite, then report per task: zero-shot, in-context and
task-vector accuracy, and the share of in-context accuracy that the task vectors recover (test answers
generated in full). The task vectors: replaced at one call, or at the same call of every later supervision
step; added as relative vectors (each test item's own demonstrations), at the last position only, or in the
best variant (also at the same call of every later step, also at the query's last token); and, as a
separate column, the mean relative vector over the dev set's demonstration sets (a task-level vector). Call,
scale and variant are chosen per task by first-token accuracy on the dev set.

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
        dev_demos, dev_alt_queries = [d["demos"] for d in dev], [d["alt_queries"] for d in dev]
        dev_relative = extract_task_vectors(model, tokenizer, dev_demos, dev_alt_queries, n, relative=True)
        dev_at_query = extract_task_vectors(model, tokenizer, dev_demos, dev_alt_queries, n, relative=True, position=-2)
        task_mean = dev_relative.mean(dim=0, keepdim=True)  # over the dev set's demonstration sets
        # (vectors, every_step, at the query too, scale) -> (layer, dev accuracy per layer)
        added = {(kind, every, at_query, scale): select_layer(
                     model, tokenizer, dev, mode="add", scale=scale, every_step=every,
                     vectors=dev_relative if kind == "own" else task_mean.expand(len(dev), -1, -1),
                     query_vectors=dev_at_query if at_query else None)
                 for kind in ("own", "task_mean") for every in (False, True) for at_query in (False, True)
                 for scale in args.add_scales if not (kind == "task_mean" and at_query)}

        def best(keep):
            return max((key for key in added if keep(key)), key=lambda key: max(added[key][1]))

        demos, alt_queries = [t["demos"] for t in test], [t["alt_queries"] for t in test]
        vectors = extract_task_vectors(model, tokenizer, demos, alt_queries, n)
        relative = extract_task_vectors(model, tokenizer, demos, alt_queries, n, relative=True)
        at_query = extract_task_vectors(model, tokenizer, demos, alt_queries, n, relative=True, position=-2)
        queries = [t["query"] for t in test]

        def added_accuracy(key):
            kind, every, with_query, scale = key
            layer = added[key][0]
            own = relative[:, layer] if kind == "own" else task_mean[:, layer].expand(len(test), -1)
            return accuracy(modulated_generate(model, tokenizer, queries, own, layer, every_step=every, mode="add",
                                               scale=scale, query_vectors=at_query[:, layer] if with_query else None),
                            test)

        chosen = {"last_only": best(lambda k: k[0] == "own" and not k[1] and not k[2]),
                  "own": best(lambda k: k[0] == "own"), "task_mean": best(lambda k: k[0] == "task_mean")}
        rows[task] = {
            "zero_shot": accuracy(greedy_answers(model, tokenizer, [build_prompt([], t["query"]) for t in test]), test),
            "in_context": accuracy(greedy_answers(model, tokenizer, [build_prompt(t["demos"], t["query"])
                                                                      for t in test]), test),
            "task_vector": accuracy(modulated_generate(model, tokenizer, queries, vectors[:, layer], layer), test),
            "task_vector_every_step": accuracy(modulated_generate(model, tokenizer, queries, vectors[:, every_layer],
                                                                  every_layer, every_step=True), test),
            "task_vector_add_last_only": added_accuracy(chosen["last_only"]),
            "task_vector_add": added_accuracy(chosen["own"]),
            "task_vector_task_mean": added_accuracy(chosen["task_mean"]),
            "layer": layer, "dev_accuracy_per_layer": layer_accuracies, "layer_every_step": every_layer,
            "dev_accuracy_per_layer_every_step": every_accuracies,
            "added_choices": {name: {"vectors": key[0], "every_step": key[1], "at_query": key[2], "scale": key[3],
                                     "layer": added[key][0], "dev_accuracy": max(added[key][1])}
                              for name, key in chosen.items()},
            "dev_accuracy_per_layer_add": {str(key): accs for key, (_, accs) in added.items()},
            "seconds": time.perf_counter() - start}
        print(f"{task:<14} zero-shot {rows[task]['zero_shot']:.2f}  in-context {rows[task]['in_context']:.2f}  "
              f"task vector {rows[task]['task_vector']:.2f} (layer {layer}), injected every step "
              f"{rows[task]['task_vector_every_step']:.2f} (layer {every_layer}), added: last position only "
              f"{rows[task]['task_vector_add_last_only']:.2f}, best variant {rows[task]['task_vector_add']:.2f} "
              f"{chosen['own']}, task mean {rows[task]['task_vector_task_mean']:.2f} {chosen['task_mean']}", flush=True)
    icl = sum(r["in_context"] for r in rows.values()) / len(rows)
    tv, tv_every, tv_last, tv_add, tv_mean = (
        sum(r[key] for r in rows.values()) / len(rows) for key in (
            "task_vector", "task_vector_every_step", "task_vector_add_last_only", "task_vector_add",
            "task_vector_task_mean"))
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
               "mean_task_vector_add_last_only": tv_last, "recovered_add_last_only": tv_last / icl if icl else None,
               "mean_task_vector_add": tv_add, "recovered_add": tv_add / icl if icl else None,
               "mean_task_vector_task_mean": tv_mean, "recovered_task_mean": tv_mean / icl if icl else None,
               "tasks": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "task_vectors.json").write_text(json.dumps(summary, indent=2))
    print(f"mean: zero-shot {summary['mean_zero_shot']:.3f}, in-context {icl:.3f}, task vector {tv:.3f}, "
          f"recovered {summary['recovered']}; injected every step: {tv_every:.3f}, recovered "
          f"{summary['recovered_every_step']}; added at the last position only: {tv_last:.3f}, recovered "
          f"{summary['recovered_add_last_only']}; added, best variant: {tv_add:.3f}, recovered "
          f"{summary['recovered_add']}; task mean added: {tv_mean:.3f}, recovered {summary['recovered_task_mean']}")


if __name__ == "__main__":
    main()
