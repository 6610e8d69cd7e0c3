"""Draw images/framework.png: the training loop and its parts, read from the code itself.

The phases of one step are the `marked_timer("...")` sections of `ppo_step`, in source order;
the engines come from `deepretrieval.search.ENGINES` and the advantage estimators from the
algorithms registry, so the picture changes when the code does.

    python scripts/draw_framework.py [--out images/framework.png]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from deepretrieval.algorithms import ADV_ESTIMATORS  # noqa: E402
from deepretrieval.search import ENGINES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the trainer step of the package this script imports (not necessarily this checkout's code/)
STEP = Path(importlib.util.find_spec("deepretrieval.trainer.step").origin)

# Which worker group owns each phase (the driver owns the rest).
OWNER = {
    "gen": "actor + rollout",
    "reward": "reward manager",
    "old_log_prob": "actor",
    "ref": "reference",
    "values": "critic",
    "adv": "driver",
    "update_critic": "critic",
    "update_actor": "actor",
}
LABEL = {
    "gen": "generate\n(n samples)",
    "reward": "reward\nparse, search,\nrecall",
    "old_log_prob": "old log-probs",
    "ref": "reference\nlog-probs",
    "values": "values",
    "adv": "advantages",
    "update_critic": "critic\nupdate",
    "update_actor": "actor update\n→ rollout weights",
}
COLOURS = {
    "actor + rollout": "#cfe3ff",
    "actor": "#cfe3ff",
    "reference": "#dfeedd",
    "critic": "#ffe5c7",
    "reward manager": "#f8d3e0",
    "driver": "#eeeeee",
}


def step_phases(source: Path = STEP) -> List[str]:
    """Names of the `marked_timer("name", ...)` blocks of the step, in source order, without the
    outer "step" timer."""
    tree = ast.parse(source.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                if (
                    isinstance(call, ast.Call)
                    and getattr(call.func, "id", None) == "marked_timer"
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                ):
                    names.append((node.lineno, call.args[0].value))
    ordered = [name for _, name in sorted(names)]
    return [n for n in ordered if n in OWNER]


def box(ax, x, y, w, h, text, colour, size=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=colour, ec="#555555", lw=1.0))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)


def arrow(ax, start, end, **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=1.2,
                                 color="#444444", **kw))


def draw(out: Path) -> Path:
    phases = step_phases()
    fig, ax = plt.subplots(figsize=(14, 6.6))
    ax.set_xlim(0, 14)
    ax.set_ylim(0, 6.6)
    ax.axis("off")
    ax.text(7, 6.35, "DeepRetrieval: one PPO / GRPO step (single controller on Ray)", ha="center",
            fontsize=13, weight="bold")

    # The step: phases left to right, as the trainer runs them.
    w, h, gap = 1.5, 0.95, 0.17
    total = len(phases) * w + (len(phases) - 1) * gap
    x0 = (14 - total) / 2
    centres = []
    for i, name in enumerate(phases):
        x = x0 + i * (w + gap)
        owner = OWNER[name]
        box(ax, x, 3.55, w, h, LABEL[name], COLOURS[owner])
        ax.text(x + w / 2, 3.35, owner, ha="center", va="top", fontsize=7.5, color="#555555")
        centres.append((x, x + w))
        if i:
            arrow(ax, (centres[i - 1][1], 4.02), (x, 4.02))
    # Loop back: the updated actor writes the next queries.
    arrow(ax, (centres[-1][1] - 0.3, 4.5), (centres[0][0] + 0.3, 4.5),
          connectionstyle="arc3,rad=0.12", linestyle="--")
    ax.text(7, 5.55, "next step: the updated policy writes the next queries", ha="center",
            fontsize=8.5, style="italic", color="#444444")

    # Data in, engines below the reward, outputs at the right.
    box(ax, 0.1, 1.3, 2.5, 1.3, "verl parquet\nprompt · ground_truth\n(pubmed, ctgov,\npubmed_mini, trials_sigir)",
        "#f3f3f3", size=8)
    arrow(ax, (1.5, 2.6), (centres[0][0] + w / 2, 3.5))

    reward_i = phases.index("reward") if "reward" in phases else 1
    rx = (centres[reward_i][0] + centres[reward_i][1]) / 2
    engines = ", ".join(sorted(ENGINES))
    box(ax, 2.9, 1.3, 3.6, 1.3,
        f"search engines\n{engines}\nquery → top-K ids → recall@K\n→ tiered reward (+5 … −3.5)",
        COLOURS["reward manager"], size=8)
    arrow(ax, (rx, 3.5), (min(max(rx, 3.1), 6.3), 2.6))

    adv_i = phases.index("adv") if "adv" in phases else len(phases) // 2
    ax_ = (centres[adv_i][0] + centres[adv_i][1]) / 2
    box(ax, 6.8, 1.3, 3.9, 1.3,
        "advantage estimators\n" + ", ".join(sorted(ADV_ESTIMATORS)).replace("reinforce_plus_plus", "reinforce++"),
        COLOURS["driver"], size=7.5)
    arrow(ax, (ax_, 3.5), (min(max(ax_, 7.0), 10.5), 2.6))

    box(ax, 11.0, 1.3, 2.9, 1.3,
        "checkpoints (atomic, resume)\nHF folder for vLLM / eval\nconsole · JSONL · wandb\n· tensorboard",
        "#f3f3f3", size=8)
    arrow(ax, (centres[-1][0] + w / 2, 3.5), (12.4, 2.6))

    ax.text(7, 0.45,
            "worker groups: actor + rollout + reference colocated in one process per device (FSDP2), critic; "
            "HF rollout on CPU, vLLM on GPUs",
            ha="center", fontsize=8.5, color="#333333")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "images" / "framework.png")
    args = parser.parse_args()
    print(draw(args.out))


if __name__ == "__main__":
    main()
