"""A plan as a picture: per-device stacked bars of what a device holds against its capacity.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend change),
so it works headless and from threads. Bytes are the planner's *projected* footprints.

Example:
    >>> plan_figure(plan, "plan.png", title="seed-dense on 256 x H100")
    'plan.png'
"""

from __future__ import annotations

import os

from lwjax.plan import MIB, Plan

# (Footprint attribute, legend label, colour)
PARTS = (
    ("weights_bytes", "weights", "#4C72B0"),
    ("activation_bytes", "activations", "#DD8452"),
    ("buffer_bytes", "buffers", "#55A868"),
    ("kv_cache_bytes", "KV cache", "#8172B3"),
    # training (mode="train"); zero, so not drawn, otherwise
    ("grad_bytes", "gradients", "#937860"),
    ("optimizer_bytes", "optimizer state", "#DA8BC3"),
    ("stash_bytes", "stashed inputs", "#8C8C8C"),
    ("backward_bytes", "backward activations", "#CCB974"),
)
LOG_RATIO = 20  # log scale once a bar exceeds the capacity this many times


def plan_figure(plan: Plan, path: str | os.PathLike, *, title: str | None = None) -> str:
    """Writes a PNG of ``plan``: one stacked bar per device (weights, activations, buffers,
    KV cache, in MiB), the capacity as a horizontal line, the bottleneck stage marked. The
    y axis is logarithmic when the bars dwarf the capacity (activations streamed under
    residency "weights" can be ~10^3 x an L2).

    Args:
        plan: the Plan to draw.
        path: where to write the PNG.
        title: first title line (default: the model, devices and hardware).

    Returns:
        ``path`` as a string.

    Example:
        >>> plan_figure(lwjax.plan(model, tokens, num_devices=4), "plan.png")
        'plan.png'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # one bar per device; a circular plan's device holds all its stages (device_footprint)
    devices = [(s, d) for s in plan.stages[:plan.ring] for d in s.devices]
    x = list(range(len(devices)))
    fig = Figure(figsize=(min(8 + 0.15 * len(devices), 16), 5.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    heights = {attr: [getattr(plan.device_footprint(s), attr) / MIB for s, _ in devices]
               for attr, _, _ in PARTS}
    totals = [sum(h[i] for h in heights.values()) for i in x]
    cap = plan.capacity_bytes / MIB
    log = max(totals, default=0) > LOG_RATIO * cap
    # Under residency "weights" activations and buffers stream through HBM: drawn faded.
    streamed = {"activation_bytes", "buffer_bytes"} if plan.residency == "weights" else set()
    bottom = [0.0] * len(x)
    for attr, label, colour in PARTS:
        h = heights[attr]
        if not any(h):
            continue
        faded = attr in streamed
        ax.bar(x, h, bottom=bottom, width=0.8, color=colour, linewidth=0,
               alpha=0.35 if faded else 1.0, label=f"{label} (streamed)" if faded else label)
        bottom = [b + v for b, v in zip(bottom, h, strict=True)]
    ax.axhline(cap, color="#C44E52", linewidth=1.6, linestyle="--",
               label=f"capacity {cap:,.2f} MiB")
    slow = plan.bottleneck.index
    marked = [i for i, (s, _) in enumerate(devices) if s.index == slow % plan.ring]
    for i in marked:
        ax.bar(i, totals[i], width=0.8, fill=False, edgecolor="black", linewidth=1.4,
               label="bottleneck stage (projected)" if i == marked[0] else None)
    if log:
        ax.set_yscale("log")
        positive = [v for h in heights.values() for v in h if v > 0]
        ax.set_ylim(bottom=min([cap, *positive]) / 4, top=max(totals) * 3)
    else:
        ax.set_ylim(0, max([cap, *totals]) * 1.15)

    ax.set_xticks(x)
    step = max(1, len(x) // 32)
    ax.set_xticklabels([f"s{','.join(map(str, plan.stages_with(s)))}\nd{d}" if i % step == 0
                        else ""
                        for i, (s, d) in enumerate(devices)], fontsize=7)
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_ylabel("MiB per device" + (" (log scale)" if log else ""))
    ax.set_xlabel("stage / device")
    head = title or (f"{plan.model or 'model'}: {len(plan.stages)} stages on "
                     f"{plan.num_devices} x {plan.hardware}")
    split = f", tp={plan.tp}" if plan.tp > 1 else ""
    ax.set_title(f"{head}\ncompression={plan.compression}, M={plan.microbatches} x "
                 f"{plan.microbatch_size}, residency={plan.residency}{split}, strategy="
                 f"{plan.strategy}\nprojected footprints per device (not measured)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), framealpha=0.9)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return os.fspath(path)
