"""The outputs of ``diffgen-fast score``: the per-sample table (CSV and npz), ``summary.json``, the figures
(nearest-neighbour grid, ratio and distance histograms, generated vs held-out distances) and ``report.md`` of a
:class:`~diffgen_fast.metrics.scoring.ScoreResult`, each written atomically.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffgen_fast._atomic import PathLike, write_json_atomic, write_npz_atomic, write_text_atomic
from diffgen_fast.figures import (
    _HIST_COLORS,
    _fmt,
    _fmt_fraction,
    _format_threshold,
    _new_figure,
    _save_figure,
    nn_grid_figure,
    ratio_histogram,
)


def write_score_csv(per: Mapping[str, Any], path: PathLike) -> Path:
    """Per-sample table of a ScoreResult: index, sample_name (source name of the sample: file name in a folder or
    zip, "file:key[row]" of arrays), nn1..nnk, nn_name (source name of nn1), d1..dk (L2), ratio, memorized and,
    when computed, inauthentic, train_nn_other_dist, cell and cell_nn_dist (C_T's distance to the nearest training
    point in the sample's own cell). Written atomically."""
    nn_index = np.asarray(per["nn_index"])
    nn_dist = np.asarray(per["nn_dist"], dtype=np.float64)
    k = nn_index.shape[1]
    extra = [c for c in ("inauthentic", "train_nn_other_dist", "cell", "cell_nn_dist") if c in per]
    names = "sample_name" in per and "nn_name" in per
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "index",
            *(["sample_name"] if names else []),
            *[f"nn{j + 1}" for j in range(k)],
            *(["nn_name"] if names else []),
            *[f"d{j + 1}" for j in range(k)],
            "ratio",
            "memorized",
            *extra,
        ]
    )
    for i in range(nn_index.shape[0]):
        row = [
            i,
            *([str(per["sample_name"][i])] if names else []),
            *[int(v) for v in nn_index[i]],
            *([str(per["nn_name"][i])] if names else []),
            *[f"{v:.9g}" for v in nn_dist[i]],
            f"{float(per['ratio'][i]):.9g}",
            int(per["memorized"][i]),
        ]
        for c in extra:
            v = per[c][i]
            row.append(int(v) if c in ("inauthentic", "cell") else f"{float(v):.9g}")
        w.writerow(row)
    return write_text_atomic(buf.getvalue(), path)


def distance_figure(
    per: Mapping[str, Any], held: Mapping[str, Any] | None, path: PathLike, data: str | None = None
) -> Path:
    """Histogram of the samples' nearest-training-point distances, and the held-out samples' for comparison."""
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    series = {"generated": np.asarray(per["nn_dist"])[:, 0]}
    if held is not None:
        series["held-out real"] = np.asarray(held["nn_dist"])[:, 0]
    allv = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    hi = float(allv.max()) if allv.size else 1.0
    edges = np.linspace(0.0, hi if hi > 0 else 1.0, 41)
    for k, (name, v) in enumerate(series.items()):
        c = _HIST_COLORS[k % len(_HIST_COLORS)]
        ax.hist(v, bins=edges, color=c, alpha=0.35, label=f"{name}: n={v.size}, median {np.median(v):.3g}")
        ax.hist(v, bins=edges, color=c, histtype="step", lw=1.4)
    ax.set_xlabel("distance to the nearest training point (L2)")
    ax.set_ylabel("samples")
    ax.set_title("Nearest-training-point distances (a spike at 0 = copies)", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, data=data)


def train_vs_heldout_figure(
    per: Mapping[str, Any],
    held: Mapping[str, Any],
    ct: Mapping[str, Any] | None,
    path: PathLike,
    data: str | None = None,
) -> Path:
    """Empirical CDFs of the distance to the nearest training point for generated and held-out samples (C_T's
    comparison: within each point's cell for the reference C_T), with C_T in the title."""
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    in_cell = ct is not None and ct.get("variant") == "reference" and "cell_nn_dist" in per
    pick = (lambda r: np.asarray(r["cell_nn_dist"])) if in_cell else (lambda r: np.asarray(r["nn_dist"])[:, 0])
    for k, (name, v) in enumerate((("generated -> train", pick(per)), ("held-out -> train", pick(held)))):
        v = np.sort(v[np.isfinite(v)])
        ax.step(
            v,
            np.arange(1, v.size + 1) / max(1, v.size),
            where="post",
            color=_HIST_COLORS[k],
            lw=1.6,
            label=f"{name} (n={v.size})",
        )
    title = "Distance to the training set: generated vs held-out real samples"
    if ct is not None:
        title += f"\nC_T = {_fmt(ct.get('C_T'), '.3g')} over {ct.get('cells_used')} cells (negative = copying)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("distance to the nearest training point" + (" in the same C_T cell" if in_cell else "") + " (L2)")
    ax.set_ylabel("fraction of samples")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, data=data)


def score_report_markdown(summary: Mapping[str, Any], files: Sequence[str]) -> str:
    s = summary
    lines = [
        "# diffgen-fast memorization report",
        "",
        f"Training set: {s['train']['source']} (N = {s['train']['n']}, item shape {tuple(s['train']['shape'])}, "
        f"fingerprint `{s['train']['fingerprint'][:16]}`). Samples: {s['n_samples']}; held-out: {s['n_heldout']}.",
        f"Space: {s['space']}; distance: {s['distance']}; values: {s.get('value_range') or 'as stored'}; "
        f"k = {s['k']}; backend: {s['backend']}; {'exact' if s['exact'] else 'approximate'} search.",
        "",
        "| test | result |",
        "|---|---|",
        f"| NN ratio < {_format_threshold(s['threshold'])} (memorized) | {s['n_memorized']} of {s['n_samples']} "
        f"({_fmt_fraction(s['fraction_memorized'])}); median ratio {_fmt(s['ratio_median'])} |",
    ]
    if "authenticity" in s:
        a = s["authenticity"]
        lines.append(
            f"| inauthentic (Alaa et al.) | {a['n_inauthentic']} ({_fmt_fraction(a['fraction_inauthentic'])}) |"
        )
    if "heldout" in s:
        lines.append(
            f"| held-out real data, NN ratio < threshold | {_fmt_fraction(s['heldout']['fraction_memorized'])} |"
        )
    if "C_T" in s:
        c = s["C_T"]
        lines.append(
            f"| C_T (Meehan et al.; << 0 copying, ~0 fresh) | {_fmt(c['C_T'])} over {c['cells_used']} of "
            f"{c['n_cells']} cells (sample share > tau = {_fmt(c['tau'])}) |"
        )
    if s.get("index"):
        i = s["index"]
        lines.append(
            f"| index | {i.get('factory')} (recall@{s['k']} on {i.get('recall_sample', 'all')} queries: "
            f"{_fmt(i.get('recall_at_k'))}) |"
        )
    if "C_T" in s:
        lines += ["", f"C_T: {s['C_T']['definition']}."]
    conv = [f"{who}: {c}" for who, cs in (s.get("conversions") or {}).items() for c in cs]
    if conv:
        lines += ["", "Conversions applied on loading:", "", *[f"- {c}" for c in conv]]
    rc = s.get("range_check") or {}
    checked = [who for who in ("samples", "heldout") if who in rc]
    if checked:
        lines.append("")
    for who in checked:
        r, t = rc[who]["range"], rc[who]["train_range"]
        verdict = "MISMATCH, scored anyway" if rc[who]["mismatch"] else "ok"
        lines.append(
            f"Value range of {who}: [{_fmt(r[0])}, {_fmt(r[1])}] against the training range "
            f"[{_fmt(t[0])}, {_fmt(t[1])}]: {verdict}."
        )
    lines += [
        "",
        "`per_sample.csv` / `per_sample.npz` name each sample and its nearest training item by source "
        "(`sample_name`, `nn_name`: file name in a folder or zip, `file:key[row]` for arrays).",
    ]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files), ""]
    lines += [f"![{f}]({f})" for f in files if f.endswith(".png")]
    return "\n".join(lines) + "\n"


def _short(name: Any, width: int = 24) -> str:
    name = str(name)
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def write_score_outputs(result: Any, out_dir: PathLike, samples: Any, train: Any) -> list[str]:
    """Write report.md, summary.json, per_sample.csv, per_sample.npz and the figures of a ScoreResult into
    out_dir; returns the file names."""
    import torch

    out = Path(out_dir)
    per, held, s = result.per_sample, result.heldout, result.summary
    aligned = (getattr(result, "extra", None) or {}).get("samples")  # aligned to the training items' layout
    samples = aligned if aligned is not None else samples
    files = ["summary.json", "per_sample.csv", "per_sample.npz"]
    # the figure's inputs first, so that a failure leaves no per-sample files behind
    label = f"{len(per['ratio'])} samples vs {getattr(train, 'source', 'the training set')} (N={len(train)})"
    vr = tuple(s["value_range"]) if s.get("value_range") else None
    order = np.argsort(np.asarray(per["ratio"]), kind="stable")[:64]
    xs = samples[torch.from_numpy(order)].cpu().numpy()
    nn = train[torch.from_numpy(np.asarray(per["nn_index"])[order, 0])].cpu().numpy()
    if xs.shape != nn.shape and xs[0].size == nn[0].size:  # a flat side: show both in the training items' shape
        xs = xs.reshape(nn.shape)
    if vr is None:
        lo, hi = float(min(xs.min(), nn.min())), float(max(xs.max(), nn.max()))
        vr = (lo, hi if hi > lo else lo + 1.0)
    titles = None
    if "sample_name" in per and "nn_name" in per:
        titles = [f"{_short(per['sample_name'][i])}\n~ {_short(per['nn_name'][i])}" for i in order]
    out.mkdir(parents=True, exist_ok=True)
    nn_grid_figure(
        xs,
        nn,
        np.asarray(per["ratio"])[order],
        out / "nn_grid.png",
        value_range=vr,
        threshold=s["threshold"],
        titles=titles,
        suptitle="Generated samples beside their nearest training points (above: sample name ~ nearest's name)"
        if titles
        else "Generated samples beside their nearest training points",
        n_total=len(per["ratio"]),
        data=label,
    )
    write_score_csv(per, out / "per_sample.csv")
    arrays = {k: v for k, v in per.items()}
    if held is not None:
        arrays.update({f"heldout_{k}": v for k, v in held.items()})
    write_npz_atomic(arrays, out / "per_sample.npz")
    ratios = {"generated": per["ratio"]}
    if held is not None:
        ratios["held-out real"] = held["ratio"]
    ratio_histogram(ratios, out / "ratio_hist.png", threshold=s["threshold"], data=label)
    distance_figure(per, held, out / "nn_dist_hist.png", data=label)
    files += ["nn_grid.png", "ratio_hist.png", "nn_dist_hist.png"]
    if held is not None:
        train_vs_heldout_figure(per, held, result.ct, out / "train_vs_heldout.png", data=label)
        files.append("train_vs_heldout.png")
    write_json_atomic(s, out / "summary.json")
    write_text_atomic(score_report_markdown(s, files), out / "report.md")
    return ["report.md", *files]
