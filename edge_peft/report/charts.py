"""The report's charts as PNG bytes (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import io
from dataclasses import dataclass

from ..errors import UserError
from .run_data import RunData


@dataclass(frozen=True)
class Chart:
    name: str  # file-name part: loss, speed, memory, lr, rank
    title: str
    png: bytes


def charts(data: RunData) -> list[Chart]:
    """One chart per quantity the run logged: loss (and held-out loss), tokens/s, RSS against the memory budget
    and the predicted peak, learning rate, and for adaptive runs the total rank against its budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise UserError('edge-peft report draws with matplotlib: pip install "edge-peft[report]"') from None
    made = []
    for name, title, ylabel, lines, levels in _specs(data):
        if not any(xs for _, xs, _ in lines):
            continue
        fig, ax = plt.subplots(figsize=(7.2, 3.2), dpi=100)
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        for label, value, style in levels:
            ax.axhline(value, linestyle=style, color="0.35", linewidth=1.2, label=f"{label} ({value:g})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) + len(levels) > 1:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        made.append(Chart(name, title, buffer.getvalue()))
    return made


def _specs(data: RunData) -> list[tuple[str, str, str, list, list]]:
    """(name, title, y label, [(label, steps, values)], [(label, level, line style)]) per chart."""
    held_out = data.series("eval_loss")
    before = (data.summary or {}).get("eval_loss_before")
    if isinstance(before, (int, float)):
        held_out = ([-1, *held_out[0]], [float(before), *held_out[1]])  # scored before the first step
    plan = data.plan or {}
    levels = [(label, float(plan[key]), style) for label, key, style in
              (("memory budget", "budget_mb", "-"), ("predicted peak", "predicted_peak_mb", "--"))
              if isinstance(plan.get(key), (int, float))]
    return [
        ("loss", "Loss", "loss", [("training loss", *data.series("loss")), ("held-out loss", *held_out)], []),
        ("speed", "Speed", "tokens/s", [("tokens/s", *data.series("tokens_per_s"))], []),
        ("memory", "Memory", "MB", [("RSS", *data.series("rss_mb")), ("peak RSS", *data.series("peak_rss_mb"))], levels),
        ("lr", "Learning rate", "learning rate", [("learning rate", *data.series("lr"))], []),
        ("rank", "Total rank (adaptive ranks)", "rank", [("total rank", *data.series("total_rank")),
                                                         ("rank budget", *data.series("rank_budget"))], []),
    ]
