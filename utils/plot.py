"""Learning curves of a run from its metrics.jsonl, as a PNG.

    python -m utils.plot runs/ppo/metrics.jsonl              # writes runs/ppo/curves.png
"""

import json
import sys
from pathlib import Path

PPO_PANELS = [("objective/scores", "score (reward model)"), ("objective/kl", "KL to reference (nats/seq)"),
              ("objective/entropy", "entropy (nats/token)"), ("objective/kl_coef", "KL coefficient kl_coef")]


def plot_metrics(metrics_path, out_png=None, panels=PPO_PANELS, step_key="iteration", title=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    panels = [(k, label) for k, label in panels if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(r[step_key], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker=".", linewidth=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(step_key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png) if out_png else metrics_path.with_name("curves.png")
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_bars(panels: dict, out_png, title=None) -> Path:
    """One bar chart per panel, side by side: panels = {panel title: {bar label: (value, error bar)}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (panel, bars) in zip(axes[0], panels.items()):
        labels = list(bars)
        ax.bar(labels, [bars[k][0] for k in labels], yerr=[bars[k][1] for k in labels], capsize=4,
               color=["tab:blue", "tab:orange", "tab:green"][: len(labels)])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


if __name__ == "__main__":
    print(plot_metrics(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
