"""Server-rendered chart geometry for the what-if sweep (the template draws the SVG, autoescaped)."""

from __future__ import annotations

from typing import Any

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 64, 20, 48


def _scale(values: list[float], low_px: float, high_px: float) -> tuple[list[float], float]:
    top = max(values) if values and max(values) > 0 else 1.0
    return [low_px + (high_px - low_px) * v / top for v in values], top


def sweep_chart(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Cloud cost (left axis) and SLA misses (right axis) against the swept value."""
    values = [float(r["value"]) for r in rows]
    first, last = (min(values), max(values)) if values else (0.0, 1.0)
    span = (last - first) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    xs = [LEFT + plot_w * (v - first) / span for v in values] if len(values) > 1 else [LEFT + plot_w / 2] * len(values)
    cost_y, cost_top = _scale([float(r["cloud_cost_usd"]) for r in rows], TOP + plot_h, TOP)
    miss_y, miss_top = _scale([float(r["sla_misses"]) for r in rows], TOP + plot_h, TOP)
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "plot": {"left": LEFT, "right": WIDTH - RIGHT, "top": TOP, "bottom": TOP + plot_h},
        "cost_points": " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, cost_y, strict=True)),
        "miss_points": " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, miss_y, strict=True)),
        "cost_top": cost_top,
        "miss_top": miss_top,
        "ticks": [{"x": x, "label": f"{v:g}"} for x, v in zip(xs, values, strict=True)],
        "dots": [
            {"x": x, "cost_y": cy, "miss_y": my, "row": r}
            for x, cy, my, r in zip(xs, cost_y, miss_y, rows, strict=True)
        ],
    }
