"""Train a TRM on the synthetic in-context task suite, then report per task: zero-shot, in-context and
task-vector accuracy (layer chosen per task on a dev set; the vector injected once, and at the same call of
every later supervision step), and the share of in-context accuracy that the task vectors recover.

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
    parser.add_argument("--dev", type=int, default=24, help="dev items per task (layer selection)")
    parser.add_argument("--test", type=int, default=100, help="test items per task")
    parser.add_argument("--demos", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="runs/task_vectors")
    parser.add_argument("--checkpoint", help="evaluate this trained model (its EMA weights) instead of training one")
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
        model = create_model(args.preset, vocab_size=tokenizer.vocab_size, max_seq_len=48, dropout=0.0,
                             eos_token_id=tokenizer.eos_id).to(device)
        config = TrainConfig(batch_size=args.batch_size, lr=1e-3, warmup_steps=200, minutes=args.minutes,
                             eval_every=500, eval_batches=10, log_every=50)
        result = train(model, train_set, val_set, config, out_dir=args.out)
    model.eval()

    rng = random.Random(1)
    rows = {}
    for task in sorted(TASKS):
        dev = [task_item(task, rng, args.demos) for _ in range(args.dev)]
        test = [task_item(task, rng, args.demos) for _ in range(args.test)]
        start = time.perf_counter()
        layer, layer_accuracies = select_layer(model, tokenizer, dev)
        every_layer, every_accuracies = select_layer(model, tokenizer, dev, every_step=True)
        vectors = extract_task_vectors(model, tokenizer, [t["demos"] for t in test], [t["alt_queries"] for t in test])
        queries = [t["query"] for t in test]
        rows[task] = {
            "zero_shot": accuracy(greedy_answers(model, tokenizer, [build_prompt([], t["query"]) for t in test]), test),
            "in_context": accuracy(greedy_answers(model, tokenizer, [build_prompt(t["demos"], t["query"])
                                                                      for t in test]), test),
            "task_vector": accuracy(modulated_generate(model, tokenizer, queries, vectors[:, layer], layer), test),
            "task_vector_every_step": accuracy(modulated_generate(model, tokenizer, queries, vectors[:, every_layer],
                                                                  every_layer, every_step=True), test),
            "layer": layer, "dev_accuracy_per_layer": layer_accuracies, "layer_every_step": every_layer,
            "dev_accuracy_per_layer_every_step": every_accuracies, "seconds": time.perf_counter() - start}
        print(f"{task:<14} zero-shot {rows[task]['zero_shot']:.2f}  in-context {rows[task]['in_context']:.2f}  "
              f"task vector {rows[task]['task_vector']:.2f} (layer {layer}), injected every step "
              f"{rows[task]['task_vector_every_step']:.2f} (layer {every_layer})", flush=True)
    icl = sum(r["in_context"] for r in rows.values()) / len(rows)
    tv = sum(r["task_vector"] for r in rows.values()) / len(rows)
    tv_every = sum(r["task_vector_every_step"] for r in rows.values()) / len(rows)
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": args.preset,
               "checkpoint": args.checkpoint, "train_steps": result["step"], "train_minutes": args.minutes, "val_loss": result["val_loss"],
               "mean_zero_shot": sum(r["zero_shot"] for r in rows.values()) / len(rows), "mean_in_context": icl,
               "mean_task_vector": tv, "recovered": tv / icl if icl else None,
               "mean_task_vector_every_step": tv_every, "recovered_every_step": tv_every / icl if icl else None,
               "tasks": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "task_vectors.json").write_text(json.dumps(summary, indent=2))
    print(f"mean: zero-shot {summary['mean_zero_shot']:.3f}, in-context {icl:.3f}, task vector {tv:.3f}, "
          f"recovered {summary['recovered']}; injected every step: {tv_every:.3f}, recovered "
          f"{summary['recovered_every_step']}")


if __name__ == "__main__":
    main()
