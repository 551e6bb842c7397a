"""The decision-quality benchmark's report (``quality.py``): headline ratios and Markdown tables.

The headline is ``efficiency_min_fmnist_FAMILY/RULE``: over the Fashion-MNIST pairs, the minimum of
(certified test coverage of the head x policy the product chooses on val_select / the test-label
ceiling on the same scores). ``certified_coverage_ratio_vs_seed[_FAMILY]`` (best certified coverage
of a new head / the seed MLP's, both maxima over test rows) is kept as a diagnostic: it is optimistic.
"""
from __future__ import annotations

import json
import math
from typing import Any

from quality_data import PAIRS
from quality_grid import CHOICE_RULES, LTT, family


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: - for None, yes/no, n/a for NaN, inf, floats to ``digits`` places."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Every (head run, policy) row."""
    cols = ["head_run", "policy", "coverage", "certified", "fnr_exit", "selective_error", "miss_rate",
            "within_target", "n_needed", "val_select_miss_rate"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def summary_table(res: dict[str, Any]) -> str:
    """One row per head run: head metrics and its best certified coverage per risk family."""
    cols = ["head_run", "accuracy", "AUGRC select / maxp", "ECE raw -> best calibrated",
            "cert. cov. FNR_exit<=2%", "cert. cov. sel.err<=2%", "cert. cov. both", "test FNR_exit / sel.err (both)",
            "CRC cov. / test miss", "ceiling FNR_exit / sel.err / both (test labels)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for run, h in res["heads"].items():
        mine = [r for r in res["rows"] if r["head_run"] == run]

        def best(fam: str) -> dict[str, Any] | None:
            rs = [r for r in mine if family(r["policy"]) == fam]
            return max(rs, key=lambda r: r["certified_coverage"] or 0.0) if rs else None

        def cov(fam: str) -> str:
            b = best(fam)
            if b is None or not b["certified"]:
                return "0 (n_needed " + fmt(min((r["n_needed"] or 10**9) for r in mine if family(r["policy"]) == fam)) + ")"
            return f"{b['certified_coverage']:.3f} ({b['policy'].split('/', 1)[1]})"

        both = best("ltt_both")
        crc = best("crc_miss_rate")
        lines.append("| " + " | ".join([
            run, fmt(h["accuracy"]), f"{h['augrc_select']:.4f} / {h['augrc_maxp']:.4f}",
            f"{h['ece_by_calibrator']['identity']:.3f} -> {h['ece_best_calibrated']:.3f} ({h['best_calibrator']})",
            cov("ltt_fnr_exit"), cov("ltt_selective_error"), cov("ltt_both"),
            "-" if not both or not both["certified"] else f"{fmt(both['fnr_exit'])} / {fmt(both['selective_error'])}",
            "-" if not crc or not crc["certified"] else f"{crc['coverage']:.3f} / {crc['miss_rate']:.3f}",
            " / ".join(f"{h[f'ceiling_test_coverage_{f}']:.3f}" for f in LTT),
        ]) + " |")
    return "\n".join(lines)


def choice_table(res: dict[str, Any]) -> str:
    """Per risk family: what the product would ship (chosen on val_select), its test scores, the
    test-label ceiling on the same scores and the efficiency."""
    cols = ["family / rule", "candidates", "chosen head / policy", "val_select cov.", "certified test cov.",
            "test FNR_exit", "test sel. err", "test miss rate", "within target", "ceiling (same scores)",
            "efficiency", "ceiling (any candidate)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for fam, c in res["product_choice"].items():
        lines.append("| " + " | ".join([
            fam, str(c["candidates"]), f"{c['head_run']} {c['policy']}",
            fmt(c["val_select_coverage"]), fmt(c["certified_coverage"]), fmt(c["fnr_exit"]),
            fmt(c["selective_error"]), fmt(c["miss_rate"]), fmt(c["within_target"]), fmt(c["ceiling"]),
            fmt(c["efficiency"]), fmt(c["ceiling_any_candidate"])]) + " |")
    return "\n".join(lines)


def headline_ratios(results: dict[str, Any]) -> None:
    """Add ``certified_coverage_ratio_vs_seed_FAMILY`` (per ltt family) and the headline (``ltt_both``) to ``results``."""
    for fam in LTT:
        ratios = [results["datasets"][p]["summary"][fam]["ratio_vs_seed"] for p in PAIRS if p in results["datasets"]]
        ok = ratios and all(r is not None for r in ratios)
        results[f"certified_coverage_ratio_vs_seed_{fam}"] = min(ratios) if ok else None
    results["certified_coverage_ratio_vs_seed"] = results["certified_coverage_ratio_vs_seed_ltt_both"]
    for fam in (*LTT, "crc_miss_rate"):
        for rule in CHOICE_RULES:
            eff = [results["datasets"][p]["product_choice"][f"{fam}/{rule}"]["efficiency"]
                   for p in PAIRS if p in results["datasets"]]
            results[f"efficiency_min_fmnist_{fam}/{rule}"] = min((e or 0.0) for e in eff) if eff else None


def print_report(results: dict[str, Any]) -> None:
    """Per dataset: the summary table, every policy row (folded) and the summary JSON; then the ratios."""
    for name, res in results["datasets"].items():
        print(f"\n## {name}\n")
        print(summary_table(res))
        print("\nWhat the product would ship (head x policy chosen on val_select, scored once on test):\n")
        print(choice_table(res))
        print(f"\n<details><summary>all policies</summary>\n\n{markdown_table(res['rows'])}\n\n</details>")
        print(json.dumps(res["summary"], indent=1, default=str))
    for fam in LTT:
        print(f"certified_coverage_ratio_vs_seed_{fam} = {results[f'certified_coverage_ratio_vs_seed_{fam}']}")
    for fam in (*LTT, "crc_miss_rate"):
        for rule in CHOICE_RULES:
            print(f"efficiency_min_fmnist_{fam}/{rule} = {fmt(results[f'efficiency_min_fmnist_{fam}/{rule}'])}"
                  + (" (target >= 0.9)" if fam == "ltt_both" else ""))
