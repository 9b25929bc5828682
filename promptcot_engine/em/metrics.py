"""Per-iteration metrics of the EM loop, and their plots."""
from __future__ import annotations

import math
from pathlib import Path


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def iteration_metrics(iteration: int, candidates: list[dict], winners: list[dict], rationales: list[dict],
                      q_training: dict, p_training: dict, unchanged: int) -> dict:
    valid = [c for c in candidates if c["valid"]]
    scored_winners = [w for w in winners if w.get("reward") is not None]
    x_tokens = sum(w["problem_tokens"] for w in scored_winners)
    nll_x = [-w["log_p_x_given_z"] for w in scored_winners]
    return {
        "iteration": iteration,
        "mean_reward": _mean([c["reward"] for c in valid]),
        "best_reward": _mean([w["reward"] for w in scored_winners]),
        "mean_log_p_z": _mean([w["log_p_z"] for w in scored_winners]),
        "nll_x": _mean(nll_x),
        "nll_x_per_token": sum(nll_x) / x_tokens if x_tokens else None,
        "rationale_tokens": _mean([w["rationale_tokens"] for w in scored_winners]),
        "mstep_rationale_tokens": _mean([r["rationale_tokens"] for r in rationales]),
        "seeds": len(winners),
        "candidates": len(candidates),
        "valid_candidates": len(valid),
        "truncated_candidates": sum(c["finish_reason"] == "length" for c in candidates),
        "seeds_without_valid_candidate": unchanged,
        "mstep_fallbacks": sum(r["fallback_to_estep"] for r in rationales),
        "q_sft_loss": q_training.get("loss"),
        "p_sft_loss": p_training.get("loss"),
    }


PLOTS = {
    "reward.png": ("reward (sum of token log-probs)", ["mean_reward", "best_reward"]),
    "nll_x.png": ("NLL of x under p", ["nll_x"]),
    "rationale_length.png": ("rationale tokens", ["rationale_tokens", "mstep_rationale_tokens"]),
    "sft_loss.png": ("final SFT loss", ["q_sft_loss", "p_sft_loss"]),
}


def plot_metrics(metrics: list[dict], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a GPU node or in CI
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    iterations = [m["iteration"] for m in metrics]
    for name, (ylabel, keys) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in keys:
            values = [m.get(key) for m in metrics]
            ax.plot(iterations, [math.nan if v is None else v for v in values], marker="o", label=key)
        ax.set_xlabel("EM iteration")
        ax.set_ylabel(ylabel)
        ax.set_xticks(iterations)
        ax.legend()
        fig.tight_layout()
        path = directory / name
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
