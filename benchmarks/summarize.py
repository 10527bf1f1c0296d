"""Markdown table of a pytest-benchmark JSON: median ms per implementation, ratios, peak memory.

    python benchmarks/summarize.py benchmarks/results/<device>.json
"""
import json
import sys
from collections import defaultdict


def summarize(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    groups, generation = defaultdict(dict), defaultdict(dict)
    for bench in data["benchmarks"]:
        table = generation if "tokens_per_s" in bench["extra_info"] else groups
        table[bench["group"]][bench["params"]["impl"]] = bench
    device = data["benchmarks"][0]["extra_info"].get("device", "?") if data["benchmarks"] else "?"
    lines = [f"device: {device}", "",
             "| case | impl | median ms | vs eager | vs compiled | peak GB |", "|---|---|---|---|---|---|"]
    for group, impls in sorted(groups.items()):
        eager = impls.get("eager", {}).get("stats", {}).get("median")
        compiled = impls.get("compiled", {}).get("stats", {}).get("median")
        for impl, bench in sorted(impls.items()):
            median = bench["stats"]["median"]
            peak = bench["extra_info"].get("peak_mem_gb")
            lines.append(f"| {group} | {impl} | {median * 1e3:.2f} | "
                         f"{eager / median if eager else float('nan'):.2f}x | "
                         f"{compiled / median if compiled else float('nan'):.2f}x | "
                         f"{f'{peak:.2f}' if peak is not None else '-'} |")
    if generation:
        lines += ["", "| case | impl | median ms | tokens/s | vs seed | cache MB | peak GB |",
                  "|---|---|---|---|---|---|---|"]
    for group, impls in sorted(generation.items()):
        seed = impls.get("seed", {}).get("extra_info", {}).get("tokens_per_s")
        for impl, bench in sorted(impls.items()):
            info = bench["extra_info"]
            rate, cache, peak = info["tokens_per_s"], info.get("cache_mb"), info.get("peak_mem_gb")
            lines.append(f"| {group} | {impl} | {bench['stats']['median'] * 1e3:.1f} | {rate:.0f} | "
                         f"{rate / seed if seed else float('nan'):.1f}x | {f'{cache:.0f}' if cache else '-'} | "
                         f"{f'{peak:.2f}' if peak is not None else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
