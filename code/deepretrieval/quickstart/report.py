"""The quickstart's report: the trainer's JSONL metrics as curves, the before/after results table
and the reward-curve figure (`results.md` and `reward_curve.png` of a run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from deepretrieval.quickstart import TASK


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The JSON lines of a metrics file (unreadable lines skipped; none when the file is missing)."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def curves(metrics: Sequence[Dict[str, Any]], task: str = TASK) -> Dict[str, List[tuple]]:
    """(step, value) series from the trainer's JSONL: training reward / recall, test recall.

    The last record of a step wins (a resumed run may repeat a step's line).
    """
    by_step: Dict[int, Dict[str, Any]] = {}
    for row in metrics:
        by_step.setdefault(int(row.get("step", 0)), {}).update(row)
    out: Dict[str, List[tuple]] = {"reward": [], "train_recall": [], "test_recall": [], "format_ok": [], "epoch": []}
    for step in sorted(by_step):
        row = by_step[step]
        if row.get("train/epoch") is not None:
            out["epoch"].append((step, int(row["train/epoch"])))
        if "critic/score/mean" in row:
            out["reward"].append((step, row["critic/score/mean"]))
        recall = _first(row, ["reward/recall_mean", f"reward/{task}/recall_mean"])
        if recall is not None:
            out["train_recall"].append((step, recall))
        fmt = _first(row, ["reward/format_error_ratio"])
        if fmt is not None:
            out["format_ok"].append((step, 1.0 - fmt))
        test = _first(row, [f"val/{task}/recall_mean", "val/recall_mean"])
        if test is not None:
            out["test_recall"].append((step, test))
    return out


def _first(row: Dict[str, Any], keys: Sequence[str]) -> Optional[float]:
    for key in keys:
        if row.get(key) is not None:
            return float(row[key])
    return None


def plot_reward_curve(metrics_path: Path, png_path: Path, title: str = "", task: str = TASK,
                      val_name: str = "test") -> Path:
    """Training reward (left axis) and training / `val_name` (the trainer's validation topics) recall@100
    (right axis) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curves(read_metrics(metrics_path), task)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if c["reward"]:
        ax.plot(*zip(*c["reward"]), color="tab:blue", marker=".", alpha=0.6, label="training reward (step mean)")
        epoch_of = dict(c["epoch"])
        if epoch_of:
            by_epoch: Dict[int, List[tuple]] = {}
            for step, value in c["reward"]:
                by_epoch.setdefault(epoch_of.get(step, 0), []).append((step, value))
            xs, ys = [], []
            for e in sorted(by_epoch):
                pts = by_epoch[e]
                mean = sum(v for _, v in pts) / len(pts)
                xs += [pts[0][0] - 0.5, pts[-1][0] + 0.5]
                ys += [mean, mean]
            ax.plot(xs, ys, color="navy", linewidth=2, label="training reward (epoch mean)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("reward", color="tab:blue")
    ax2 = ax.twinx()
    if c["train_recall"]:
        ax2.plot(*zip(*c["train_recall"]), color="tab:orange", alpha=0.7, label="training recall@100")
    if c["test_recall"]:
        ax2.plot(*zip(*c["test_recall"]), color="tab:green", marker="o", label=f"{val_name} recall@100 (greedy)")
    ax2.set_ylabel("recall@100")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, png_path)


def save_figure(fig: Any, png_path: "str | Path") -> Path:
    """Lay out, write (making the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def results_table(evals: Dict[str, Dict[str, Any]], metrics_path: Path, task: str = TASK,
                  val_name: str = "test") -> str:
    """The before/after Markdown table: test recall@100 per method, then the training curve ends and the
    `val_name` recall during training."""
    lines = ["| policy | test recall@100 [95% CI] | query errors |", "|---|---|---|"]
    for name, cell in evals.items():
        ci = f" [{cell['low']:.3f}, {cell['high']:.3f}]" if cell.get("low") is not None else ""
        errs = ", ".join(f"{k} {v}" for k, v in sorted(cell.get("errors", {}).items())) or "none"
        lines.append(f"| {name} | {cell['recall']:.3f}{ci} (n={cell.get('n')}) | {errs} |")
    c = curves(read_metrics(metrics_path), task)
    text = "\n".join(lines) + "\n"
    if c["reward"]:
        # one epoch = every training topic once: per-step means swing with the topics drawn, so the
        # learning shows in the per-epoch means (same topics each epoch)
        epoch_of = dict(c["epoch"])
        groups: Dict[int, Dict[str, List[float]]] = {}
        for key in ("reward", "train_recall"):
            for step, value in c[key]:
                groups.setdefault(epoch_of.get(step, 0), {}).setdefault(key, []).append(value)
        epochs = sorted(groups)
        text += ("\n| training (GRPO), per epoch | " + " | ".join(
            f"epoch {e + 1} ({len(groups[e].get('reward', []))} steps)" for e in epochs) + " |\n")
        text += "|---|" + "---|" * len(epochs) + "\n"
        for key, label, fmt in (("reward", "reward, mean", "{:.2f}"), ("train_recall", "recall@100, mean", "{:.3f}")):
            cells = [fmt.format(sum(groups[e][key]) / len(groups[e][key])) if groups[e].get(key) else "" for e in epochs]
            text += f"| {label} | " + " | ".join(cells) + " |\n"
        if c["test_recall"]:
            text += (f"\n{val_name.capitalize()} recall@100 during training (greedy; step: value): "
                     + ", ".join(f"{s}: {v:.3f}" for s, v in c["test_recall"]) + "\n")
    return text
