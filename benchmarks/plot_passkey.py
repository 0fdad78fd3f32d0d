"""One passkey plot across lengths from several `benchmarks/quality.py` runs (one run per
length, since a 64K part takes most of an hour): accuracy by prompt length per setting,
with the sample count and the key-in-the-middle count on each point.

    python benchmarks/plot_passkey.py benchmarks/results/passkey_w2k_16k_20 benchmarks/results/passkey_w2k_32k \\
        benchmarks/results/passkey_w2k_64k --rename W2K_topk="exact top-k" --out benchmarks/results/passkey_w2k.png

A setting measured at one length in several runs keeps the run with more samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def collect(runs: list[Path]) -> dict[str, dict[int, tuple[float, int, tuple[int, int]]]]:
    """setting -> length -> (accuracy, samples, (middle found, middle total))."""
    out: dict[str, dict[int, tuple[float, int, tuple[int, int]]]] = {}
    for run in runs:
        data = json.loads((run / "quality.json").read_text())
        samples = data["passkey_samples"]
        for name, entry in data["settings"].items():
            for length, acc in entry["passkey"].items():
                middle = tuple(entry["passkey_by_position"].get(f"{length}:middle", (0, 0)))
                old = out.setdefault(name, {}).get(int(length))
                if old is None or old[1] < samples:
                    out[name][int(length)] = (acc, samples, middle)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="output folders of quality.py (each with quality.json)")
    ap.add_argument("--rename", action="append", default=[], metavar="NAME=LABEL", help="legend label of a setting")
    ap.add_argument("--only", default="", help="comma list of setting names to plot (default: all)")
    ap.add_argument("--reference", type=float, default=None,
                    help="a horizontal line: e.g. stock vLLM's accuracy inside its trained length")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    labels = dict(r.split("=", 1) for r in a.rename)
    results: dict[str, dict] = {}
    for name, by_len in collect(a.runs).items():  # settings renamed alike share a line
        if a.only and name not in a.only.split(","):
            continue
        merged = results.setdefault(labels.get(name, name), {})
        for n, v in by_len.items():
            if n not in merged or merged[n][1] < v[1]:
                merged[n] = v
    if not results:
        raise SystemExit("no passkey results in " + ", ".join(map(str, a.runs)))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for i, (name, by_len) in enumerate(results.items()):
        lengths = sorted(by_len)
        marker, line = styles[i % len(styles)]
        ax.plot(lengths, [by_len[n][0] for n in lengths], marker=marker, linestyle=line, label=name,
                markersize=8 - 2 * (i % 3), alpha=0.85)
        for n in lengths:  # counts under (or over) the point, one text row per series so equal points stay legible
            acc, samples, (mid_found, mid_total) = by_len[n]
            dy = -(11 + 9 * i) if acc > 0.5 else 6 + 9 * i
            ax.annotate(f"{round(acc * samples)}/{samples} (mid {mid_found}/{mid_total})", (n, acc),
                        textcoords="offset points", xytext=(4, dy), fontsize=7, color=f"C{i}")
    if a.reference is not None:
        ax.axhline(a.reference, color="grey", linestyle=":", label="stock vLLM inside its trained length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.1)
    ax.legend(fontsize=8, loc="center right")
    ax.set_title("passkey retrieval past the window (W = d = 2K)")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
