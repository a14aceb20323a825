"""What the offline evaluation reports: the acceptance table and the acceptance plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.files import atomic_save_file


def _spec_entries(per_dataset: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(k, v) for k, v in per_dataset.items() if isinstance(v, dict) and "acceptance_length" in v]


def acceptance_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: dataset, draft shape, acceptance length, per-position acceptance, rounds, tokens."""
    lines = ["| dataset | draft | acceptance length | per-position acceptance | rounds | tokens |",
             "| --- | --- | --- | --- | --- | --- |"]
    for dataset, per in results.items():
        for spec, s in _spec_entries(per):
            pos = " / ".join(f"{p:.3f}" for p in s["per_position"])
            lines.append(f"| {dataset} | {spec} | {s['acceptance_length']:.3f} | {pos} | {s['rounds']} | "
                         f"{s['generated_tokens']} |")
    return "\n".join(lines)


def plot_acceptance(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """One row per dataset: per-position acceptance (left) and the accepted-length histogram (right), one series per
    draft shape. Written atomically (temp + rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(results))
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.2 * rows), squeeze=False)
    for (dataset, per), (ax_pos, ax_hist) in zip(results.items(), axes):
        entries = _spec_entries(per)
        width = 0.8 / max(1, len(entries))
        for j, (spec, s) in enumerate(entries):
            label = f"{spec} (len {s['acceptance_length']:.2f})"
            ax_pos.plot(range(1, len(s["per_position"]) + 1), s["per_position"], marker="o", label=label)
            total = max(1, sum(s["histogram"]))
            xs = [n + (j - (len(entries) - 1) / 2) * width for n in range(len(s["histogram"]))]
            ax_hist.bar(xs, [h / total for h in s["histogram"]], width=width, label=spec)
        ax_pos.set(title=f"{dataset}: acceptance per draft position", xlabel="draft position i",
                   ylabel="P(accepted >= i)", ylim=(0, 1.02))
        ax_hist.set(title=f"{dataset}: accepted draft tokens per round", xlabel="accepted tokens n",
                    ylabel="share of rounds")
        depth = max((len(s["per_position"]) for _, s in entries), default=1)
        ax_pos.set_xticks(range(1, depth + 1))
        ax_hist.set_xticks(range(depth + 1))
        ax_pos.legend(fontsize=8)
        ax_hist.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_file(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return Path(path)
