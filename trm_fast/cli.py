"""The `trm-fast` command line (also `python -m trm_fast`): train, generate, eval, count-params, diagnose,
train-spm, extract-texts, doctor, demo. Bad input ends in one line naming the problem and exit status 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

COMMAND_ERRORS = (FileNotFoundError, ValueError, ImportError, KeyError)


def _device(name: Optional[str]) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this torch sees no CUDA device")
    return device


def _overrides(pairs: List[str]) -> dict:
    """`key=value` pairs; values are JSON where they parse (numbers, true/false, null), strings otherwise."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            result[key] = json.loads(value)
        except json.JSONDecodeError:
            result[key] = value
    return result


def _check_vocab(tokenizer, config) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but the model's vocab_size "
                         f"is {config.vocab_size}: the checkpoint and the tokenizer do not belong together")


def _load_model(args, device):
    from .checkpoint import load_checkpoint, read_checkpoint
    from .data import load_tokenizer
    checkpoint = read_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer(args.tokenizer or checkpoint.get("tokenizer") or "byte")
    _check_vocab(tokenizer, checkpoint["config"])
    model = load_checkpoint(args.checkpoint, map_location=device, use_ema=not args.raw_weights).eval()
    return model, tokenizer


def _datasets(args, tokenizer, seq_len):
    from .corpus import default_corpus
    from .data import TokenDataset, read_texts
    texts = read_texts(args.data) if args.data else default_corpus().split("\n\n")
    dataset = TokenDataset(texts, tokenizer, seq_len, pack=args.pack, max_samples=args.max_samples)
    if args.val_data:
        return dataset, TokenDataset(read_texts(args.val_data), tokenizer, seq_len, pack=args.pack)
    return dataset.split(args.val_fraction)


def cmd_train(args) -> None:
    from .checkpoint import read_checkpoint
    from .data import load_tokenizer
    from .model import TRMModel
    from .presets import preset_config
    from .training import TrainConfig, train

    device = _device(args.device)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.resume and args.preset is None and not args.set:
        config = read_checkpoint(args.resume)["config"]
    else:
        overrides = {"vocab_size": tokenizer.vocab_size, "pad_token_id": tokenizer.pad_id,
                     "eos_token_id": tokenizer.eos_id, **({"max_seq_len": args.seq_len} if args.seq_len else {}),
                     **_overrides(args.set)}
        config = preset_config(args.preset or "tiny", **overrides)
    _check_vocab(tokenizer, config)
    if args.random_windows and not args.pack:
        raise ValueError("--random-windows needs --pack (the windows are cut from the packed text)")
    train_set, val_set = _datasets(args, tokenizer, args.seq_len or config.max_seq_len)
    model = TRMModel(config, kernels=args.kernels).to(device)
    print(f"trm-fast train: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, "
          f"{len(train_set)} training / {len(val_set)} validation samples of <= {train_set.max_seq_len} tokens, "
          f"tokenizer {tokenizer.name}", flush=True)
    train_config = TrainConfig(
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_steps=args.max_steps, minutes=args.minutes, grad_clip=args.grad_clip, ema_decay=args.ema_decay,
        adam_beta2=args.adam_beta2,
        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
        log_every=args.log_every, seed=args.seed, bf16=not args.no_bf16, random_windows=args.random_windows,
        cuda_graph=args.cuda_graph)
    result = train(model, train_set, val_set, train_config, out_dir=args.out, resume=args.resume,
                   tokenizer=tokenizer.name)
    print(f"checkpoint: {result['checkpoint']}\nmetrics: {Path(args.out) / 'metrics.jsonl'}\n"
          f"curve: {Path(args.out) / 'curve.png'} (blue: training loss, red: validation loss)")
    if args.summary:
        summary = {key: result[key] for key in ("step", "elapsed", "train_loss", "val_loss", "val_ppl")}
        summary["best_val_loss"] = min(e["val_loss"] for e in result["history"] if "val_loss" in e)
        targets = torch.cat([target for _, target in val_set])
        summary["val_chars_per_token"] = len(tokenizer.decode(targets.tolist())) / len(targets)
        summary["val_nats_per_char"] = result["val_loss"] / summary["val_chars_per_token"]
        Path(args.summary).write_text(json.dumps({**summary, "device": str(device), "config": config.to_dict(),
                                                  "train_config": vars(train_config)}, indent=2))


def cmd_generate(args) -> None:
    device = _device(args.device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = _load_model(args, device)
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise FileNotFoundError(f"prompts file not found: {args.prompts_file}")
        prompts = [line for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if line]
        if not prompts:
            raise ValueError(f"{args.prompts_file} has no prompt (one per line)")
    else:
        prompts = [args.prompt]
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   supervision_steps=args.supervision_steps, q_threshold=args.q_threshold)
    encoded = [tokenizer.encode(prompt, add_eos=False) for prompt in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("a prompt is empty: give at least one character")
    if args.stream:
        for prompt, ids in zip(prompts, encoded):
            print(prompt, end="", flush=True)
            new = []
            for token in model.stream(ids, **options):
                new.append(token)
                text = tokenizer.decode(new)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    print(text, end="", flush=True)
                    new = []
            print(tokenizer.decode(new), flush=True)
        return
    outputs = model.generate_batch(encoded, **options) if len(encoded) > 1 else [model.generate(encoded[0], **options)]
    for output in outputs:
        print(tokenizer.decode(output))
        if len(outputs) > 1:
            print("---")


def cmd_eval(args) -> None:
    from .data import TokenDataset, read_texts
    from .training import evaluate
    device = _device(args.device)
    model, tokenizer = _load_model(args, device)
    dataset = TokenDataset(read_texts(args.data), tokenizer, args.seq_len or model.config.max_seq_len, pack=args.pack)
    result = evaluate(model, dataset, args.batch_size, args.max_batches, bf16=not args.no_bf16)
    print(json.dumps({"loss": round(result["loss"], 5), "ppl": round(result["ppl"], 4), "tokens": result["tokens"]}))


def format_count(n: int) -> str:
    """The seed's format: 1.23B / 1.23M / 1.23K / 123."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def count_parameters(model: torch.nn.Module) -> dict:
    """total / trainable / frozen, tied weights counted once."""
    params = list(model.parameters())  # parameters() yields a shared (tied) tensor once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def cmd_count_params(args) -> None:
    from .checkpoint import load_checkpoint
    from .presets import create_model
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint)
    else:
        model = create_model(args.preset, **_overrides(args.set))
    counts = count_parameters(model)
    print(json.dumps(counts) if args.json else
          "  ".join(f"{key}: {format_count(value)} ({value:,})" for key, value in counts.items()))


def cmd_diagnose(args) -> None:
    from .corpus import default_corpus
    from .data import TokenDataset, dataset_batches, load_tokenizer, read_texts
    from .diagnostics import diagnostics_report
    from .presets import create_model
    device = _device(args.device)
    if args.checkpoint:
        model, tokenizer = _load_model(args, device)
    else:
        torch.manual_seed(0)
        tokenizer = load_tokenizer(args.tokenizer or "byte")
        model = create_model(args.preset, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                             **_overrides(args.set)).to(device)
    texts = read_texts(args.data) if args.data else default_corpus().split("\n\n")
    dataset = TokenDataset(texts, tokenizer, args.seq_len or min(model.config.max_seq_len, 256), pack=True)
    batch = next(dataset_batches(dataset, args.batch_size))
    report = diagnostics_report(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), args.out)
    for key, values in report["diagnostics"].items():
        print(f"{key:<12}" + " ".join(f"{v:9.4f}" for v in values))
    print(f"wrote {Path(args.out) / 'report.json'}, steps.png, norms.png, convergence.png")


def cmd_train_spm(args) -> None:
    from .data import train_spm
    path = train_spm(args.input, args.model_prefix, args.vocab_size, args.character_coverage, args.model_type)
    print(f"wrote {path} and {Path(path).with_suffix('.vocab')}")


def cmd_extract_texts(args) -> None:
    from .data import extract_texts
    print(f"wrote {extract_texts(args.input_dir, args.output)} texts to {args.output}")


def cmd_doctor(args) -> None:
    from .dispatch import format_kernel_status, kernel_status
    status = kernel_status()
    print(json.dumps(status, indent=2) if args.json else format_kernel_status(status))


def cmd_demo(args) -> None:
    from .demo import run_demo
    run_demo(seconds=args.seconds, preset=args.preset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trm-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, handler, help):
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    def inference_options(sub):
        sub.add_argument("--checkpoint", required=True, help="a checkpoint written by `trm-fast train` or the seed")
        sub.add_argument("--tokenizer", help="'byte' or a SentencePiece .model (default: the checkpoint's)")
        sub.add_argument("--raw-weights", action="store_true", help="use the trained weights, not their EMA")
        sub.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")

    def data_options(sub, required):
        sub.add_argument("--data", nargs="+", required=required,
                         help="jsonl / jsonl.gz files with a 'text' field, or plain text files" +
                              ("" if required else " (default: the built-in corpus)"))
        sub.add_argument("--seq-len", type=int, help="tokens per sample (default: the model's max_seq_len)")
        sub.add_argument("--pack", action="store_true", help="concatenate the texts and cut full-length samples")

    train = command("train", cmd_train, "train a TRM (AdamW, warm-up + decay, EMA, bf16 on GPU)")
    data_options(train, required=False)
    train.add_argument("--val-data", nargs="+", help="validation files (default: the last --val-fraction of --data)")
    train.add_argument("--val-fraction", type=float, default=0.05)
    train.add_argument("--max-samples", type=int)
    train.add_argument("--tokenizer", default="byte", help="'byte' (default) or a SentencePiece .model")
    train.add_argument("--preset", choices=["tiny", "small", "base"], help="model size (default tiny)")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config fields, e.g. dropout=0.0")
    train.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    train.add_argument("--random-windows", action="store_true",
                       help="with --pack: each step takes windows at random offsets of the text, not the fixed cuts")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--minutes", type=float, help="wall-time budget (the learning rate decays over it)")
    train.add_argument("--grad-clip", type=float, default=1.0)
    train.add_argument("--ema-decay", type=float, default=0.995)
    train.add_argument("--adam-beta2", type=float, default=0.999)
    train.add_argument("--eval-every", type=int, default=200)
    train.add_argument("--eval-batches", type=int, default=20)
    train.add_argument("--save-every", type=int, default=0)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    train.add_argument("--cuda-graph", action="store_true",
                       help="on CUDA, replay each training step as one CUDA graph (fixed batch shapes)")
    train.add_argument("--out", default="runs/trm", help="checkpoint, metrics.jsonl and curve.png go here")
    train.add_argument("--resume", help="continue from this checkpoint (same config, optimizer, step, data order)")
    train.add_argument("--summary", help="also write the final numbers as JSON to this file")
    train.add_argument("--device")

    gen = command("generate", cmd_generate, "generate text from a checkpoint")
    inference_options(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt")
    prompt.add_argument("--prompts-file", help="one prompt per line, decoded together as a batch")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--supervision-steps", type=int)
    gen.add_argument("--q-threshold", type=float, default=0.7)
    gen.add_argument("--no-halting", dest="q_threshold", action="store_const", const=None,
                     help="run every supervision step (no q_threshold)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument("--seed", type=int)

    ev = command("eval", cmd_eval, "loss and perplexity of a checkpoint on a file")
    inference_options(ev)
    data_options(ev, required=True)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-batches", type=int)
    ev.add_argument("--no-bf16", action="store_true")

    count = command("count-params", cmd_count_params, "parameters of a checkpoint or a preset")
    source = count.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint")
    source.add_argument("--preset", choices=["tiny", "small", "base"])
    count.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    count.add_argument("--json", action="store_true")

    diag = command("diagnose", cmd_diagnose, "recursion diagnostics: JSON report and plots")
    source = diag.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint")
    source.add_argument("--preset", choices=["tiny", "small", "base"], help="a freshly initialised model")
    diag.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    diag.add_argument("--tokenizer", help="'byte' or a SentencePiece .model (default: the checkpoint's, or byte)")
    diag.add_argument("--raw-weights", action="store_true")
    diag.add_argument("--data", nargs="+", help="text to diagnose on (default: the built-in corpus)")
    diag.add_argument("--seq-len", type=int)
    diag.add_argument("--batch-size", type=int, default=8)
    diag.add_argument("--out", default="runs/diagnostics")
    diag.add_argument("--device")

    spm = command("train-spm", cmd_train_spm, "train a SentencePiece model (seed defaults)")
    spm.add_argument("--input", required=True, help="a text file, one sentence or document per line")
    spm.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    spm.add_argument("--vocab-size", type=int, default=16000)
    spm.add_argument("--character-coverage", type=float, default=0.9995)
    spm.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])

    extract = command("extract-texts", cmd_extract_texts, "collect the 'text' of every *.jsonl.gz under a folder")
    extract.add_argument("--input-dir", required=True)
    extract.add_argument("--output", required=True)

    doctor = command("doctor", cmd_doctor, "torch, CUDA, Triton, the compiled extension, live kernels")
    doctor.add_argument("--json", action="store_true", help="print the status as JSON")

    demo = command("demo", cmd_demo, "train a tiny TRM on the built-in corpus for a few minutes, then generate")
    demo.add_argument("--seconds", type=float, default=120.0, help="training time budget")
    demo.add_argument("--preset", default="tiny")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except COMMAND_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"trm-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
