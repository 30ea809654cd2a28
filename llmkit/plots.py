"""Charts the notebooks share."""

import matplotlib.pyplot as plt


def roofline(results: list[dict], ax=None, title: str | None = None):
    """Decode tokens/s against weight bytes, one point per path and scheme, with the bandwidth limit.

    A decode step reads every weight once, so at best tokens/s = bandwidth / weight bytes: the
    line each device's points approach from below.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    by_device: dict[str, list[dict]] = {}
    for r in results:
        by_device.setdefault(r.get("gpu") or r.get("processor") or r["device"], []).append(r)
    markers = {"eager": "o", "compile": "s", "aoti": "^", "pte": "D"}
    for i, (device, rows) in enumerate(by_device.items()):
        color = f"C{i}"
        sizes = [r["weight_bytes"] for r in rows]
        lo, hi = min(sizes) / 2, max(sizes) * 2
        bandwidth = max(r["device_bandwidth"] for r in rows)
        ax.plot([lo, hi], [bandwidth / lo, bandwidth / hi], "--", color=color,
                label=f"{device}: limit at {bandwidth / 1e9:.0f} GB/s")  # fmt: skip
        for r in rows:
            ax.scatter(r["weight_bytes"], r["decode_tokens_per_s"], marker=markers.get(r["path"], "o"), color=color)
            ax.annotate(f"{r['scheme']}/{r['path']}", (r["weight_bytes"], r["decode_tokens_per_s"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="weight bytes", ylabel="decode tokens/s",
           title=title or "Decode speed against the memory-bandwidth limit")  # fmt: skip
    ax.legend(fontsize=8)
    return ax
