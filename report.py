"""What evaluate.py writes besides its figures: the markdown table it prints and the sweep's csv."""
import csv


def markdown_report(r: dict) -> str:
    """The results (`r`, what metrics.json holds) as markdown: per token count, the comparison,
    codebook usage, the adaptive criteria, early exit and complexity."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"## {r['dataset']} {r['images']} images, protocol {r['protocol']}, {r['checkpoint']}", "",
             f"| tokens | L1 | PSNR | {'code MSE' if r['vqgan']['base'] == 'vae' else 'token acc.'} | rFID |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for row in r["per_token_count"]:
        space = f"{row['code_mse']:.4f}" if "code_mse" in row else f"{row['token_accuracy']:.3f}"
        lines.append(f"| {row['tokens']} | {row['l1']:.4f} | {row['psnr']:.2f} | {space} | {num(row['rfid'], '.2f')} |")
    v = r["vqgan"]
    lines.append(f"| {v['base'].upper()} ({v['tokens']} 2D) | {v['l1']:.4f} | {v['psnr']:.2f} | - | "
                 f"{num(v['rfid'], '.2f')} |")
    if r["compare"]:
        rows = {"this": r["per_token_count"], "compare": r["compare"]["per_token_count"]}
        lines += ["", f"L1 per token count, {r['checkpoint']} against {r['compare']['checkpoint']}:", "",
                  "| checkpoint | " + " | ".join(str(row["tokens"]) for row in rows["this"]) + " |",
                  "| --- |" + " ---: |" * len(rows["this"])]
        for name, path in (("this", r["checkpoint"]), ("compare", r["compare"]["checkpoint"])):
            lines.append(f"| {path} | " + " | ".join(f"{row['l1']:.4f}" for row in rows[name]) + " |")
    for name, usage in (("", r["codebook"]), (" (compare)", (r["compare"] or {}).get("codebook"))):
        if usage:
            lines.append(f"\nlatent codebook{name} at the longest code: {usage['codes_used']}/{usage['codebook_size']} "
                         f"codes used ({100 * usage['fraction_used']:.0f}%), perplexity {usage['perplexity']:.1f}")
    lines += ["", "| adaptive criterion | mean tokens | dataset repr. | L1 | PSNR | rFID |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["adaptive_l1"] + r["adaptive_l1_saturated"] + r["adaptive_token_accuracy"]:
        lines.append(f"| {row['criterion']} | {row['mean_tokens']:.1f} | {row['dataset_representation']:.3f} | "
                     f"{row['l1']:.4f} | {row['psnr']:.2f} | {num(row.get('rfid'), '.2f')} |")
    c, s = r["pixel_vs_token_criterion"], r["early_exit"]
    lines += ["", f"{c['pixel']} (mean {c['mean_tokens']:.1f} tokens) vs {c['token']} (mean "
              f"{c['token_mean_tokens']:.1f}): same token count for {100 * c['same_count']:.0f}% of images",
              f"early exit on {s['images']} images: pixel criterion {s['speedup_pixel']:.2f}x, token criterion "
              f"{s['speedup_token']:.2f}x faster than running every iteration; same counts as the exhaustive "
              f"search for {100 * s['same_counts_as_exhaustive']:.0f}% of images"]
    if r["complexity"]:
        cx = r["complexity"]
        counts = list(next(iter(cx["l1_per_level_per_tokens"].values())))
        lines += ["", "| complexity level | " + " | ".join(f"L1 @ {c}" for c in counts) + " |",
                  "| ---: |" + " ---: |" * len(counts)]
        for level, row in cx["l1_per_level_per_tokens"].items():
            lines.append(f"| {level} | " + " | ".join(f"{row[c]:.4f}" for c in counts) + " |")
        lines.append("")
        rho = cx["spearman_complexity_vs_tokens"]
        lines.append(f"complexity vs chosen tokens ({cx['criterion']}): Spearman "
                     f"{'undefined (one count for all)' if rho is None else format(rho, '.3f')}; mean tokens per level "
                     + ", ".join(f"{k}: {v:.1f}" for k, v in cx["mean_tokens_per_level"].items())
                     + f"; {cx['lengths_chosen_for_5pct']} lengths chosen for >= 5% of images")
    return "\n".join(lines)


def write_sweep_csv(path, rows):
    """One line per adaptive criterion (`rows`: the sweeps of metrics.json), the points of Fig. 7."""
    fields = ["criterion", "threshold", "mean_tokens", "dataset_representation", "l1", "psnr", "rfid"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
