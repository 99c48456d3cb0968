"""Pool the classifier ablation over training seeds: each row's metrics as the mean and range over seeds.

    python benchmarks/classifier_seeds.py benchmarks/results/classifier_ablation \
        benchmarks/results/classifier_ablation/seed1 benchmarks/results/classifier_ablation/seed2 \
        --out benchmarks/results/classifier_ablation/seeds

Each folder holds one `ablation.json` written by `benchmarks/classifier_ablation.py` on the same split (the same
855 validation and 855 test images). Rows are matched by name, with the value a row chose on validation (such as
the logit-adjustment τ) left out of the name. A row missing from a seed's record is pooled over the seeds that
have it, and the table says how many. The paired-bootstrap interval of each seed is kept as it was measured; the
table counts the seeds whose interval lies wholly above zero.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from pathlib import Path

ROW_CHOICE = re.compile(r"\s*\((?:τ|tau)\s*=\s*[^)]*\)")
METRICS = {
    "test_balanced_accuracy": "test BA",
    "test_malignant_auc": "test AUC",
    "mel_recall": "mel recall",
    "test_ece_calibrated": "ECE",
    "val_balanced_accuracy": "val BA",
}


def row_key(name: str) -> str:
    """A row's name without the value it chose on validation: '+ logit adjustment (τ = 0.8, ...)' -> '+ logit
    adjustment'."""
    return ROW_CHOICE.sub("", name).strip()


def pool(records: list[dict]) -> list[dict]:
    """One entry per row (in the first record's order, then any new rows): per-metric values over the seeds."""
    order: list[str] = []
    by_row: dict[str, list[dict]] = {}
    for record in records:
        for row in record["rows"]:
            key = row_key(row["row"])
            if key not in by_row:
                order.append(key)
                by_row[key] = []
            values = {m: row[m] for m in METRICS if m in row}
            values["mel_recall"] = row["test_recall"]["mel"]
            delta = row.get("delta_vs_first_row")
            if delta:
                values["delta_ba"] = delta["balanced_accuracy"]["delta"]
                values["delta_auc"] = delta["malignant_auc"]["delta"]
                values["ba_above_zero"] = delta["balanced_accuracy"]["low"] > 0
                values["auc_above_zero"] = delta["malignant_auc"]["low"] > 0
            values["train_minutes"] = row.get("train_minutes")
            by_row[key].append(values)
    pooled = []
    for key in order:
        runs = by_row[key]
        entry: dict = {"row": key, "seeds": len(runs)}
        for metric in [*METRICS, "delta_ba", "delta_auc"]:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            if values:
                entry[metric] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                                 "values": values}
        for flag in ("ba_above_zero", "auc_above_zero"):
            flags = [r[flag] for r in runs if flag in r]
            if flags:
                entry[flag] = f"{sum(flags)} of {len(flags)}"
        pooled.append(entry)
    return pooled


def markdown(pooled: list[dict]) -> str:
    """The pooled table: mean [min, max] per metric."""

    def cell(entry: dict, metric: str, signed: bool = False) -> str:
        if metric not in entry:
            return ""
        v = entry[metric]
        fmt = "{:+.3f}" if signed else "{:.3f}"
        if len(v["values"]) == 1:
            return fmt.format(v["mean"])
        return f"{fmt.format(v['mean'])} [{fmt.format(v['min'])}, {fmt.format(v['max'])}]"

    header = ["row", "seeds", "val BA", "test BA", "test AUC", "mel recall", "ECE", "Δ BA", "Δ BA > 0",
              "Δ AUC", "Δ AUC > 0"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in pooled:
        lines.append("| " + " | ".join([
            e["row"], str(e["seeds"]), cell(e, "val_balanced_accuracy"), cell(e, "test_balanced_accuracy"),
            cell(e, "test_malignant_auc"), cell(e, "mel_recall"), cell(e, "test_ece_calibrated"),
            cell(e, "delta_ba", True), e.get("ba_above_zero", ""), cell(e, "delta_auc", True),
            e.get("auc_above_zero", ""),
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="folders holding one ablation.json each")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = []
    for folder in args.folders:
        path = folder / "ablation.json"
        if not path.is_file():
            raise SystemExit(f"'{folder}' holds no ablation.json; expected a benchmarks/classifier_ablation.py record")
        records.append(json.loads(path.read_text()))
    sizes = {(r["val_n"], r["test_n"]) for r in records}
    if len(sizes) != 1:
        raise SystemExit(f"the records score different splits (val_n, test_n) = {sorted(sizes)}; expected one split")
    pooled = pool(records)
    text = markdown(pooled)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.md").write_text(text + "\n")
    (args.out / "seeds.json").write_text(json.dumps({
        "study": "classifier_ablation_seeds",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/classifier_seeds.py " + " ".join(map(str, args.folders)) + f" --out {args.out}",
        "sources": [str(f / "ablation.json") for f in args.folders],
        "training_commands": [r.get("training_command") for r in records],
        "rows": pooled,
    }, indent=2))


if __name__ == "__main__":
    main()
