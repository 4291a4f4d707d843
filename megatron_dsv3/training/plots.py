"""Pictures of a run: the loss curves and the expert load of every MoE layer over steps."""

from __future__ import annotations

from typing import Dict, List


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: List[Dict], path: str, title: str = "deepseek-v3-tiny") -> None:
    plt = _pyplot()
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["lm_loss"] for r in history], label="LM loss", lw=1)
    if history and history[0].get("mtp_loss"):
        for d in range(len(history[0]["mtp_loss"])):
            ax.plot(steps, [r["mtp_loss"][d] for r in history], label=f"MTP depth {d + 1}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(history: List[Dict], path: str, num_layers: int = 0) -> None:
    """Heatmap per MoE layer: tokens per expert (relative to the mean) at every step."""
    import numpy as np

    plt = _pyplot()
    layers = len(history[0]["expert_load"]) if history else 0
    if not layers:
        return
    fig, axes = plt.subplots(layers, 1, figsize=(8, 2.2 * layers), squeeze=False)
    for i in range(layers):
        load = np.array([r["expert_load"][i] for r in history], dtype=float)  # [steps, E]
        rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
        im = axes[i, 0].imshow(rel.T, aspect="auto", cmap="viridis", interpolation="nearest",
                               vmin=0, vmax=max(2.0, float(rel.max())))
        number = history[0].get("moe_layers", list(range(1, layers + 1)))[i]
        name = f"MTP {number - num_layers}" if num_layers and number > num_layers else f"layer {number}"
        axes[i, 0].set_ylabel(f"{name}\nexpert")
        fig.colorbar(im, ax=axes[i, 0], label="load / mean")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("expert load over steps (aux-loss-free bias balancing)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
