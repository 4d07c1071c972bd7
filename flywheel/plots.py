"""The round's picture: held-out accuracy per instruction type (champion vs candidate) and the training loss by
step, as a PNG for the run page (a Prefect image artifact) and the round's MLflow run."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path


def round_plot(champion: Mapping[str, float], candidate: Mapping[str, float], loss: Sequence[tuple[int, float]],
               title: str, path: Path) -> Path:
    """Two panels: accuracy per instruction type (bars, champion and candidate side by side) and the loss curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    kinds = sorted(set(champion) | set(candidate))
    fig, (types, curve) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.28 * len(kinds) + 1.2)),
                                       gridspec_kw={"width_ratios": [3, 2]})
    positions = range(len(kinds))
    types.barh([p + 0.2 for p in positions], [champion.get(k, 0.0) for k in kinds], height=0.4, label="champion",
               color="#a5a5a5")
    types.barh([p - 0.2 for p in positions], [candidate.get(k, 0.0) for k in kinds], height=0.4, label="candidate",
               color="#4472c4")
    types.set_yticks(list(positions), kinds, fontsize=7)
    types.invert_yaxis()
    types.set_xlim(0, 1)
    types.set_xlabel("held-out accuracy")
    types.legend(loc="lower right", fontsize=8)
    if loss:
        steps, values = zip(*sorted(loss))
        curve.plot(steps, values, marker="o", color="#c55a11")
    curve.set_xlabel("optimizer step")
    curve.set_ylabel("training loss")
    curve.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def data_url(path: Path) -> str:
    """The PNG inline (``data:`` URL): the run page shows it without any server serving the file."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
