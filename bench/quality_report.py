"""The quality benchmark's markdown and plot: floors first, methods ranked as they come out, samples."""
from __future__ import annotations

import statistics
from pathlib import Path

from rlkd.metrics import mean_std
from rlkd.tasks.skills import FAMILIES, OPEN_ENDED


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    return "{:.1f} ± {:.1f}".format(*mean_std(values)) if values else "-"


def _split(scores: dict, open_ended: bool) -> float:
    fams = [f for f in FAMILIES if (f in OPEN_ENDED) == open_ended and f in scores["exact_match_family"]]
    return statistics.mean(scores["exact_match_family"][f]["mean"] for f in fams)


COLUMNS = ["exact match", "deterministic", "open-ended", "diversity", "ROUGE-L", "gold CE", "TOP-1 agr.", "length",
           "EOS %", "ExAccErr(16) %", "train s", "student tokens"]


def _row(name: str, lr, rs: list[dict]) -> str:
    sc = [r["scores"] for r in rs]
    cols = [_ms([s["exact_match_mean"] for s in sc]), _ms([_split(s, False) for s in sc]),
            _ms([_split(s, True) for s in sc]), _ms([s.get("answer_diversity") for s in sc]),
            _ms([s["rougeL_mean"] for s in sc]), _ms([r.get("gold_ce") for r in rs]),
            _ms([100 * r["top1_agreement"] for r in rs if "top1_agreement" in r]),
            _ms([s["length_mean"] for s in sc]), _ms([s["eos_rate_mean"] for s in sc]),
            _ms([r.get("exacc_err_16") for r in rs]), _ms([r.get("train_seconds") for r in rs]),
            _ms([r.get("generated_tokens") for r in rs])]
    return f"| {name} | {lr if lr is not None else '-'} | " + " | ".join(cols) + " |"


def table(size: str, floors: list[dict], runs: list[dict]) -> str:
    lines = [f"### Student {size}", "", "| method | lr | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for f in floors:
        if f["student"] in ("-", size):
            lines.append(_row(f"*{f['method']}*", None, [f]))
    methods = sorted({r["method"] for r in runs if r["student"] == size},
                     key=lambda m: -statistics.mean(r["scores"]["exact_match_mean"] for r in runs
                                                    if r["method"] == m and r["student"] == size))
    for m in methods:
        rs = [r for r in runs if r["method"] == m and r["student"] == size]
        name = m + (f" (TOP-1 vs adapted teacher {_ms([100 * r['top1_agreement_adapted'] for r in rs])})"
                    if "top1_agreement_adapted" in rs[0] else "")
        lines.append(_row(name, rs[0]["lr"], rs))
    return "\n".join(lines) + "\n"


def samples(floors: list[dict], runs: list[dict]) -> str:
    lines = ["### Samples: answers to the first 3 test prompts (student S, first training seed, first sampling seed)",
             ""]
    shown = [(f["method"] + (f" {f['student']}" if f["student"] != "-" else ""), f["scores"]["samples"])
             for f in floors]
    shown += [(m, next(r for r in runs if r["method"] == m and r["student"] == "S")["scores"]["samples"])
              for m in dict.fromkeys(r["method"] for r in runs)]
    for name, answers in shown:
        lines.append(f"- **{name}**: " + " · ".join(f"`{a}`" for a in answers))
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], floors: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig, ax = plt.subplots(figsize=(max(6, len(methods) * 0.9), 4))
    for k, (size, color) in enumerate((("S", "tab:blue"), ("XS", "tab:orange"))):
        vals = [[r["scores"]["exact_match_mean"] for r in runs if r["method"] == m and r["student"] == size]
                for m in methods]
        ax.bar([i + 0.4 * k for i in range(len(methods))], [statistics.mean(v) if v else 0 for v in vals], 0.4,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], color=color, label=f"student {size}")
    for f, style in zip(floors, ("--", ":", "-.", "-.")):
        ax.axhline(f["scores"]["exact_match_mean"], linestyle=style, color="gray",
                   label=f"{f['method']} {f['student'] if f['student'] != '-' else ''}".strip())
    ax.set_xticks([i + 0.2 for i in range(len(methods))], methods, rotation=30)
    ax.set(ylabel="test exact match % (mean ± std over seeds)", title="skills suite")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(head: str, floors: list[dict], runs: list[dict], sweeps: dict[str, str], png: Path) -> str:
    plot(runs, floors, png)
    parts = [head, "", "Floors in italics. Methods sorted by exact match, as they came out. Columns are means ± std "
             "over training seeds (each run scored over the sampling seeds); diversity is the mean number of distinct "
             "valid answers per open-ended prompt over the sampling seeds.", ""]
    parts += [table(size, floors, runs) for size in ("S", "XS")]
    parts += [samples(floors, runs), "### Learning-rate sweeps (student S, validation exact match)", ""]
    parts += [f"**{m}**\n\n{t}" for m, t in sweeps.items()]
    return "\n".join(parts)
