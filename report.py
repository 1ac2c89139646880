"""What evaluate.py writes besides its figures: the markdown table it prints and the sweep's csv.
And what analyze.py prints: its results as markdown, a section per analysis (`analysis_report`)."""
import csv

from tasks import SCORE_NAMES, TASKS


def markdown_report(r: dict) -> str:
    """The results (`r`, what metrics.json holds) as markdown: per token count, the comparison,
    codebook usage, the adaptive criteria, early exit and complexity."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"## {r['dataset']} {r['images']} images, protocol {r['protocol']}, {r['checkpoint']}", "",
             f"| tokens | L1 | PSNR | {'code MSE' if 'code_mse' in r['per_token_count'][0] else 'token acc.'} | rFID |",
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


# -----------------------------------------------------------------------------
# analyze.py's report

def number(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def difference(d: dict, fmt: str = "+.3f") -> str:
    """A difference with its standard error, and whether it holds (beyond two of them) when claimed."""
    verdict = "" if "holds" not in d else " (holds)" if d["holds"] else " (does not hold)"
    return f"{d['difference']:{fmt}} ± {d['se']:{fmt[1:]}}{verdict}"


def analysis_report(r: dict) -> str:
    """analyze.py's results (`r`, what analysis.json holds) as markdown, one section per analysis."""
    lines = [f"## {r['dataset']}, {r['images']} images, {r['checkpoint']}"]
    lines += ["", "Entropy of the latent tokens' attention over the 2D tokens (last encoder layer; 1 = uniform over "
              "the image, lower = more localized), per token count:"]
    lines += [f"- {name}: " + ", ".join(f"{k}: {v:.3f}" for k, v in row.items())
              for name, row in r["attention_entropy"].items()]
    if "attention_entropy_decoder" in r:
        decoder = r["attention_entropy_decoder"]
        lines += [f"- the decoder's maps ({decoder['layer']}), {name}: " + ", ".join(f"{k}: {v:.3f}"
                                                                                   for k, v in row.items())
                  for name, row in decoder.items() if name != "layer"]
        lines += ["", "Fig. 3's \"sharper & sparser attention\": entropy at iteration 1 minus at the last (positive: "
                  "sharper):"] + [f"- {name}: {difference(d, '+.4f')}: {d['verdict']} ({d['why']})"
                                   for name, d in r["attention_sharper"].items()]
    sections = [("binding", binding_lines), ("complexity", complexity_lines), ("selection", selection_lines),
                ("depth_regressor", task_alignment_lines), ("linear_probe", probe_lines),
                ("familiarity", familiarity_lines), ("segments", segment_lines)]
    for key, section in sections:
        if key in r:
            lines += section(r, r["tokens"])
    return "\n".join(lines)


def binding_lines(r: dict, counts: list) -> list:
    """The ARI table per level and token count, then foreground ARI, mIoU and the controls."""
    b, last = r["binding"], counts[-1]
    lines = ["", "Object binding: each 2D token assigned to the latent token it attends most (last encoder layer), "
             "scored against the scene's segments (ARI; 1 = the objects exactly, 0 = chance):", "",
             "| ARI | " + " | ".join(str(k) for k in counts) + f" | one pass of {last} |",
             "| --- |" + " ---: |" * (len(counts) + 1)]
    for level, groups in b.items():
        name = "all levels" if level == "all" else f"level {level}"
        lines.append(f"| {name} | " + " | ".join(number(s["ari"]) for s in groups["recurrent"].values())
                     + f" | {number(groups['one_pass'][last]['ari'])} |")
    lines.append("| all, shuffled | " + " | ".join(number(s["ari"]) for s in b["all"]["shuffled"].values()) + " | - |")
    everything = b["all"]
    for metric, name in (("fg_ari", "foreground ARI"), ("miou", "matched mIoU")):
        lines.append(f"\n{name}, all levels, per token count: "
                     + ", ".join(f"{k}: {number(s[metric])}" for k, s in everything["recurrent"].items())
                     + f"; shuffled at {last}: {number(everything['shuffled'][last][metric])}"
                     + f"; one pass of {last}: {number(everything['one_pass'][last][metric])}")
    lines.append("latent tokens the partition uses (mean), all levels: " + ", ".join(
        f"{k}: {s['segments']:.1f}" for k, s in everything["recurrent"].items())
        + f"; one pass: {everything['one_pass'][last]['segments']:.1f}"
        + "; true segments (background halves and visible shapes): "
        + f"{everything['one_pass'][last]['true_segments']:.1f}")
    lines.append("ARI, all levels, partition from the latent tokens' maps instead (each 2D token to the latent "
                 "whose map is highest there): " + ", ".join(
                     f"{k}: {number(s['ari'])}" for k, s in everything["recurrent_latent_to_image"].items()))
    return lines


def complexity_lines(r: dict, counts: list) -> list:
    """L1 per level and token count; the mean tokens each histogram threshold gives each level."""
    c = r["complexity"]
    lines = ["", "| L1 per level | " + " | ".join(str(k) for k in counts) + " |", "| ---: |" + " ---: |" * len(counts)]
    for level, row in c["l1_per_level"].items():
        lines.append(f"| {level} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
    for criterion, per_level in c["chosen_tokens_per_level"].items():
        means = {level: sum(k * v for k, v in hist.items()) / max(1, sum(hist.values()))
                 for level, hist in per_level.items()}
        lines.append(f"\n{criterion}: mean tokens per level " + ", ".join(f"{lv}: {m:.1f}" for lv, m in means.items()))
    return lines


def selection_lines(r: dict, counts: list) -> list:
    """The classifier on the originals; per criterion the fraction of the tokens each task needs."""
    best = r["selection"]["every image at one count"][-1]
    tasks = [task for task in TASKS if best[task] is not None]
    lines = []
    if "classifier" in r:
        c = r["classifier"]
        lines.append(f"\nclassifier of {c['what']} ({c['classes']} classes): top-1 accuracy "
                     f"{c['accuracy_on_originals']:.3f} on the original images")
    lines += ["", "Fraction of the maximum tokens at which each task reaches 95% of its performance at the maximum "
              "(losses within 1/0.95 of it; - : not within the criterion's range):", "",
              "| criterion | " + " | ".join(TASKS[t][0] for t in tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for criterion, fractions in r["fraction_for_95_percent"].items():
        lines.append(f"| {criterion} | " + " | ".join(number(fractions[t], ".2f") for t in tasks) + " |")
    lines.append(f"\nat {counts[-1]} tokens: " + ", ".join(f"{TASKS[t][0]} {number(best[t], '.4f')}" for t in tasks))
    return lines


def task_alignment_lines(r: dict, counts: list) -> list:
    """The task models on the originals, TSC = TOI by each scorer, the tokens each task needs, the claims."""
    lines = ["", f"| task model | architecture | seed | score | originals | {counts[0]} tokens | {counts[-1]} tokens "
             "| control |", "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |"]
    for net in r["task_nets"].values():
        lines.append(f"| {net['role']} | {net['architecture']} | +{net['seed_offset']} | {net['score']} | "
                     f"{net['originals']:.3f} | {net['fewest_tokens']:.3f} | {net['most_tokens']:.3f} | "
                     f"{net['control_name']} {net['control']:.3f} |")
    lines.append("\nTSC = TOI (Fig. 6/9): each task's advantage under its own criterion over another's at the same "
                 "fraction of the tokens (± bootstrap SE), scored by the independent judge and by the criterion's "
                 "own model:")
    for task, scorers in r["task_alignment"].items():
        for scorer, a in scorers.items():
            lines.append(f"- {SCORE_NAMES[task]}, {scorer}: " + "; ".join(
                f"over {other}: " + ("-" if o["advantage"] is None else f"{o['advantage']:+.4f} ± {o['se']:.4f}")
                for other, o in a["over"].items()))
    t = r["tokens_per_task"]
    lines.append(f"\ntokens until the task is done as well as at {counts[-1]} tokens, and at every larger count "
                 f"({t['images']} images the classifier judge gets right at {counts[-1]}; {t['rule']}): "
                 f"classification {t['classification']['tokens']:.1f} ({100 * t['classification']['censored']:.0f}% "
                 f"censored at {counts[-1]}), depth {t['depth']['tokens']:.1f} ({100 * t['depth']['censored']:.0f}% "
                 f"censored); depth - classification {'-' if t['se'] is None else difference(t, '+.2f')}")
    lines += ["", "| claim | paper | ours, ± SE | verdict |", "| --- | --- | --- | --- |"]
    for claim, c in r["task_claims"].items():
        ours = "-" if c["difference"] is None else f"{c['difference']:+.4f} ± {c['se']:.4f}"
        lines.append(f"| {claim} | {c['paper']} | {ours} | {c['verdict']}: {c['why']} |")
    return lines


def probe_lines(r: dict, counts: list) -> list:
    """§A.4: the probe's accuracy per iteration and at the last per pooled prefix, per pooling; the
    controls; the claims with their verdicts and the standard error reached."""
    p, last, K = r["linear_probe"], len(counts), counts[0]
    lines = ["", f"Linear probe of {p['label']} ({p['classes']} classes; {p['train_images']} train images, "
             f"{p['test_images']} test images of {p['test_classes']} classes); accuracy per iteration of the first "
             f"{K} tokens / all so far, and at iteration {last} per first tokens pooled:", "",
             "| pooling | " + " | ".join(f"iteration {t}" for t in range(1, last + 1)) + " | "
             + " | ".join(f"first {k}" for k in counts) + " |", "| --- |" + " ---: |" * (2 * last)]
    cell = lambda table, t, k: number(table.get(t, {}).get(k))  # noqa: E731 (- : not probed)
    for source in ("trained", "untrained"):
        for pooling, table in p[source].items():
            per_iteration = [f"{cell(table, t, K)} / {cell(table, t, counts[t - 1])}" for t in range(1, last + 1)]
            lines.append(f"| {source}, {pooling} | " + " | ".join(per_iteration) + " | "
                         + " | ".join(cell(table, last, k) for k in counts) + " |")
    lines.append(f"the untrained control scored on the first {p['control_test_images']} test images; pooled VQGAN "
                 f"grid {p['vqgan grid']:.3f}; chance {p['chance']:.3f}; compared: {p['compared']}")
    lines += ["", "| claim (paper) | pooling | ours ± SE | verdict |", "| --- | --- | ---: | --- |"]
    for pooling, claims in p["claims"].items():
        for name, c in claims.items():
            claim = (f"(a) {name}: iterations {c['iterations']} - {c['against']} (+{c['paper']:.3f})"
                     if name.startswith("recurrence") else
                     f"(b) iteration {c['iteration']}, first {c['tokens']} - all {c['against']} tokens (-)")
            lines.append(f"| {claim} | {pooling} | {c['difference']:+.3f} ± {c['se']:.3f} | {c['verdict']} |")
    lines.append(f"largest SE of the claims (one mean) {p['largest_se']:.4f}, target <= {p['se_target']:.4f} "
                 f"(a third of the paper's +3.9 points): {'met' if p['se_target_met'] else 'not met'}")
    return lines


def familiarity_lines(r: dict, counts: list) -> list:
    """§A.2 at Tab. 1's lengths: per image set, grouped, the base's floor, L1 at both lengths, the gap plain
    and relative to the floor, the tokens of each rule; then each claim against in distribution, judged."""
    f = r["familiarity"]
    short, full = f["lengths"]
    sets = [(name, row) for name, row in f.items() if isinstance(row, dict) and "l1" in row]
    lines = ["", f"Familiarity (§A.2, Tab. 1's lengths {short} and {full} tokens); tokens by {f['criterion']} "
             f"(default) and by {f['threshold rule']} alone; matched {f['matched']}:", "",
             f"| images | group | base alone | L1 at {short} | L1 at {full} | gap | gap / base | tokens, default | "
             "tokens, threshold | base above the threshold | FID gap |", "| --- | --- |" + " ---: |" * 9]
    for name, row in sets:
        lines.append(f"| {name} | {row['group']} | {row['base_l1']:.4f} | {row['l1'][short]:.4f} | "
                     f"{row['l1'][full]:.4f} | {row['gap']['difference']:.4f} | "
                     f"{row['relative_gap']['difference']:.3f} | {row['tokens']['default']['mean']:.1f} | "
                     f"{row['tokens']['threshold']['mean']:.1f} | {100 * row['above_threshold_at_the_floor']:.0f}% | "
                     f"{number(row.get('fid_gap'), '.2f')} |")
    lines += ["", "| unseen - in distribution (paper: larger, more) | " + " | ".join(
        ("gap", "gap / base", "tokens, default", "tokens, threshold")) + " |", "| --- |" + " --- |" * 4]
    for name, row in sets[1:]:
        claims = row["vs_in_distribution"]
        judged = ("gap", "relative_gap", "tokens, default rule", "tokens, threshold rule")
        cells = [f"{claims[k]['difference']:+.4f} ± {claims[k]['se']:.4f}: {claims[k]['verdict']}" for k in judged]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    floors = {c["why"] for _, row in sets[1:] for c in row["vs_in_distribution"].values()
              if c["verdict"] == "inconclusive" and c["why"].startswith("at its floor")}
    lines += [f"- {why}" for why in sorted(floors)]
    return lines


def segment_lines(r: dict, counts: list) -> list:
    """Tab. 2's protocol: the main reading's mIoU per thresholding, matching and X, the other readings and
    the controls at the best X per image, and the claims with their verdicts."""
    s = r["segments"]
    tables, main, paper = s["tables"], s["main reading"], s["paper"]
    last = counts[-1]
    row = lambda values: " | ".join(number(values.get(k)) for k in counts)  # noqa: E731
    lines = ["", f"Tab. 2's protocol on the maps of {s['maps']}. mIoU over the objects of {s['images']} images "
             f"({s['images without an object in sight']} without an object in sight left out): per object the IoU "
             f"of its best token's segment, or of the token matched one to one (Hungarian); main reading: {main}:",
             "", "| thresholding, matching | X | " + " | ".join(str(k) for k in counts) + " | paper, 1 -> 8 |",
             "| --- | --- |" + " ---: |" * (len(counts) + 1)]
    for thresholding, by_matching in tables[main].items():
        for matching, rows in by_matching.items():
            for x, values in rows.items():
                p = paper.get(x) if thresholding == "percentile" else None  # Tab. 2's header: a percentile
                cited = (f"{p:.3f}" if not isinstance(p, dict) else
                         f"{p['iteration 1']:.3f} -> {p['iteration 8']:.3f}") if p is not None else "-"
                lines.append(f"| {thresholding}, {matching} | {x} | {row(values)} | {cited} |")
    lines += ["", "At the best X per image (best token), every reading and control:", "",
              "| reading | thresholding | " + " | ".join(str(k) for k in counts) + " |",
              "| --- | --- |" + " ---: |" * len(counts)]
    for name, table in tables.items():
        for thresholding, by_matching in table.items():
            lines.append(f"| {name} | {thresholding} | {row(by_matching['best token']['best X per image'])} |")
    for key, head in s["per head"].items():
        if key.endswith("best token"):
            best = head["best head"]
            lines += [f"| decoder, per head, mean over heads | {key.split(',')[0]} | {row(head['mean over heads'])} |",
                      f"| decoder, head {best['head']} (the best at {last}, chosen on these images) | "
                      f"{key.split(',')[0]} | {row(best)} |"]
    lines += ["", "| claim | thresholding, matching | ours ± SE | verdict |", "| --- | --- | --- | --- |"]
    for claim, by_key in s["claims"].items():
        for key, d in by_key.items():
            paper_note = f" (paper {d['paper']:+.3f})" if "paper" in d else ""
            lines.append(f"| {claim}{paper_note} | {key} | {difference(d)} | {d['verdict']}: {d['why']} |")
    return lines
