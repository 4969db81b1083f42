"""``parity.html``: the parity report for people, one self-contained page (styles inline, plots as data URLs, no
script, no font or file fetched), from ``parity.json`` and its plots.

The verdict first, in one sentence; then every hop with the statistic and threshold it was judged by; the lossy
variants with their agreement and accuracy drop and confidence bounds; the "against exact float64" checks; the
plots; where a failing translation first drifts; and the ids of everything the verdict is about.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #1d2430;
       max-width: 1280px; }
h1 { font-size: 20px; margin: 0 0 6px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.verdict { font-size: 16px; padding: 10px 14px; border-radius: 6px; margin: 12px 0 18px; }
.verdict.pass { background: #e6f4ea; border: 1px solid #34a853; }
.verdict.fail { background: #fce8e6; border: 1px solid #d93025; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.pass { background: #34a853; color: white; } .badge.fail { background: #d93025; color: white; }
.badge.unverified, .badge.undecided { background: #f9ab00; color: #1d2430; }
.badge.recorded { background: #dadce0; color: #1d2430; }
.note { color: #57606a; font-size: 12px; } code { font-size: 12px; } img { max-width: 100%; }
"""


def render_parity_html(report: dict, *, title: str, plots: dict[str, Path], lineage: dict[str, str]) -> str:
    """The page for ``report`` (parity.json's content); ``plots``: caption → PNG file; ``lineage``: name → id."""
    verdict = report["verdict"]
    parts = [f"<h1>{_e(title)}</h1>",
             f'<div class="verdict {"pass" if verdict == "pass" else "fail"}">{_e(verdict_sentence(report))}</div>']
    parts += _divergence(report.get("divergence"))
    parts += ["<h2>Each hop against its reference</h2>", _hops(report)]
    lossy = [hop for hop in report["hops"] if hop.get("accuracy_drop") or hop.get("disagreement")]
    if lossy:
        parts += ["<h2>Lossy variants: agreement and accuracy drop</h2>", _lossy(lossy)]
    parts += _int8_layers(report.get("int8_layers"))
    parts += _int8_layers(report.get("int8_weights"))
    parts += _int8_fallback(report.get("int8_fallback"))
    parts += ["<h2>Against the exact (float64) values</h2>", _exact(report)]
    parts += ["<h2>Plots</h2>"] + [_figure(caption, path) for caption, path in plots.items() if Path(path).is_file()]
    ids = [[_e(name), f"<code>{_e(value)}</code>"] for name, value in lineage.items()]
    parts += ["<h2>What this verdict is about</h2>", _table(["", "sha256 or id"], ids)]
    model = report.get("error_model") or {}
    parts += ["<h2>The error model</h2>",
              f"<p><b>{_e(model.get('name', 'unnamed'))}</b> — described in crossport's "
              f"<code>{_e(model.get('document', 'docs/parity.md'))}</code>"
              f" (<a href=\"{_e(model.get('document', 'docs/parity.md'))}\">link, from a checkout</a>). "
              f"False-alarm rate per run at most {_e(str(model.get('false_alarm', '-')))}. "
              f"B on this run: {_e(BOUNDS.get(model.get('bound'), 'not recorded'))}.</p>"]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


# parity.json's error_model.bound, in words (docs/parity.md, "The error model" and "Deep networks")
BOUNDS = {"running": "the running error bound, layer by layer",
          "adjoint": "the first-order bound, the sum of squares of its coefficients computed by one backward pass "
                     "per class",
          "sampled": "the first-order bound, the sum of squares of its coefficients bounded from 16 Gaussian "
                     "tangents"}


def verdict_sentence(report: dict) -> str:
    """The verdict in one sentence: what passed, or the first check that failed and by how much."""
    hops = report["hops"]
    examples = report["examples"]
    if report["verdict"] == "pass":
        unverified = report.get("undecided") or []
        tail = (f"; {', '.join(unverified)} could not be judged on {examples} examples and "
                "is marked unverified") if unverified else ""
        for replaced, mixed in (report.get("replaced") or {}).items():
            tail += (f"; {replaced} did not pass the gate and is replaced by {mixed}, which keeps the fewest layers "
                     "in float that pass it")
        return (f"PASS: every hop from {report['reference']} to the published formats is within its derived bound "
                f"on {examples} test images, and every float32 file matches the exact float64 values{tail}.")
    failing = [hop for hop in hops if hop["verdict"] == "fail"]
    if failing:
        first = failing[0]
        reason = first["failures"][0] if first["failures"] else "see the table below"
        return f"FAIL at {first['hop']}: {reason.removeprefix(first['hop'] + ': ')}. Nothing was published."
    exact = next((check for check in report.get("against_exact", []) if check["verdict"] == "fail"), None)
    if exact is not None:
        return f"FAIL against the exact values: {exact['failures'][0]}. Nothing was published."
    return f"FAIL: {report.get('detail') or 'a check failed'}. Nothing was published."


def _hops(report: dict) -> str:
    rules = {rule["candidate"]: rule for rule in report.get("tolerances", [])}
    rows = []
    for hop in report["hops"]:
        outputs = {o["name"]: o for o in hop["outputs"]}
        ratios = [o["worst_ratio"] for o in hop["outputs"] if o.get("worst_ratio") is not None]
        rule = rules.get(hop["candidate"], {})
        statistic = "; ".join(_e(str(rule[key])) for key in ("values", "top1") if rule.get(key))
        rows.append([
            _e(hop["hop"]), _num(outputs.get("scores", {}).get("max_abs")),
            _num(outputs.get("logits", {}).get("max_abs")),
            _num(max(ratios) if ratios else None, ".2g"), _percent(hop["top1_agreement"], 4),
            str(hop["near_ties_excluded"]), _percent(hop["candidate_accuracy"], 2), statistic or "-",
            _badge("unverified" if hop["verdict"] == "undecided" else hop["verdict"])])
    return _table(["hop", "scores max |Δ|", "logits max |Δ|", "Δ / bound", "top-1 agreement", "near ties",
                   "accuracy", "statistic and threshold", "verdict"], rows) + (
        f"<p class=\"note\">{_lower_note(report).strip()}</p>" if _lower_note(report) else "")


def _lossy(hops: list[dict]) -> str:
    rows = []
    for hop in hops:
        cells = [_e(hop["hop"])]
        for key in ("disagreement", "accuracy_drop"):
            test = hop.get(key)
            cells.append("-" if not test else (
                f"{test['estimate']:.3%} (bounds {test['lower']:.3%} … {test['upper']:.3%}, limit "
                f"{test['limit']:.2%}; {_e(test['test'])}) "
                f"{_badge('unverified' if test['decision'] == 'undecided' else test['decision'])}"))
        cells.append(_badge("unverified" if hop["verdict"] == "undecided" else hop["verdict"]))
        rows.append(cells)
    return _table(["variant", "top-1 disagreement with the float model", "accuracy drop", "verdict"], rows)


def _exact(report: dict) -> str:
    rows = []
    for check in report.get("against_exact", []):
        for stats in check["outputs"]:
            rows.append([_e(check["artifact"]), _e(stats["name"]), _num(stats["max_abs"]), _num(stats["rms"]),
                         _num(stats["worst_ratio"], ".2g"), _num(stats.get("probe_ratio"), ".2g"),
                         _num(stats.get("sign_statistic"), ".2f"),
                         _num(check.get("threshold"), ".3g"),
                         _badge(check["verdict"] if check["judged"] else "recorded")])
    export = report.get("export_function")
    if export:
        rows.append(["export (graph vs model, exact)", "logits", _num(export["max_abs"]), "-",
                     _num(export["worst_ratio"], ".2g"), "-", "-", "-", _badge(export["verdict"])])
    return _table(["artifact", "output", "max |error|", "rms", "error / bound B", "on the probe", "sign test T",
                   "threshold t", "verdict"], rows) + (
        "<p class=\"note\">Judged: |error| ≤ B everywhere, and the sign test's T below t on the dithered probe; "
        f"lossy files are recorded, not judged here.{_lower_note(report)}</p>")


def _lower_note(report: dict) -> str:
    """Where the test split held the lower bound L on some images, what its 'error / bound' figures are."""
    walked = (report.get("error_model") or {}).get("bound_walked")
    if not walked:
        return ""
    return (f" B was walked on {walked['images']:,} of {walked['of']:,} test images, those where an fp32 error "
            "passed its lower bound L ≤ B or an answer changed; on the others L stands in, so the test split's "
            "error / bound is a ceiling (the error is at most that share of B), and its near ties are those L alone "
            "can reorder (an answer that changed is always walked). On the probe B is walked on every input.")


def _int8_layers(diagnosis: dict | None, shown: int = 10) -> list[str]:
    if not diagnosis:
        return []
    rows = [[str(rank), f"<code>{_e(layer['layer'])}</code>", _e(layer["op"]),
             _percent(layer["typical_relative_error"], 1), _num(layer["rmse_over_scale"], ".2f"),
             _num(layer["scale"], ".3g"), _num(layer["max_abs_error"], ".3g")]
            for rank, layer in enumerate(diagnosis["layers"][:shown], 1)]
    return [f"<h2>{_e(diagnosis['variant'])}: where int8 loses accuracy, layer by layer</h2>",
            f"<p>Not a plain pass ({_e('; '.join(diagnosis['why']))}). "
            + ("Each quantized layer's weights against the fp32 file's (its activations stay float, so its weights "
               "are all it loses)" if diagnosis.get("of") == "weights" else
               f"Each quantized layer against the float layer on {diagnosis['samples']} test images")
            + f": the typical relative error of its values (median |Δ|/|value|), and its rms error in quantization "
              f"steps (rounding alone gives {diagnosis['rounding_only']:.2f}). Worst first:</p>",
            _table(["rank", "layer (output tensor)", "op", "typical relative error", "rms error / step", "step",
                    "max |error|"], rows)]


def _int8_fallback(fallback: dict | None) -> list[str]:
    if not fallback:
        return []
    rows = [[str(index + 1), str(len(candidate["float_layers"])),
             ", ".join(f"<code>{_e(layer)}</code>" for layer in candidate["float_layers"]),
             _percent(candidate["accuracy"], 2), f"{candidate['bytes']:,}", _badge(candidate["verdict"])]
            for index, candidate in enumerate(fallback["candidates"])]
    chosen = fallback.get("chosen")
    outcome = (f"Candidate {chosen + 1} passed and is published as int8_mixed, in place of int8_full."
               if chosen is not None else "No candidate passed: int8_full's failure stands.")
    return ["<h2>int8 fallback: the fewest layers kept in float that pass the gate</h2>",
            f"<p>int8_full failed ({_e('; '.join(fallback['trigger'] or []))}). Tried: {_e(fallback['rule'])}. "
            f"{_e(outcome)}</p>",
            _table(["candidate", "layers in float", "which", "test accuracy", "bytes", "verdict"], rows)]


def _divergence(divergence: dict | None) -> list[str]:
    if not divergence:
        return []
    first = divergence.get("first")
    nodes = divergence.get("nodes") or []
    covered = (f" ({len(nodes)} intermediate tensors compared between ONNX Runtime and the TensorFlow translation; "
               f"the {first['index']} node(s) before it agree within the tolerance)" if first else "")
    return ["<h2>Where the translation first drifts</h2>", f"<p>{_e(divergence['summary'])}{_e(covered)}.</p>"]


def _figure(caption: str, path: Path) -> str:
    return (f'<figure><img alt="{_e(caption)}" src="{_png(path)}">'
            f'<figcaption class="note">{_e(caption)}</figcaption></figure>')


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _badge(state: str) -> str:
    return f'<span class="badge {_e(state)}">{_e(state)}</span>'


def _num(value, spec: str = ".2e") -> str:
    return "-" if value is None else format(value, spec)


def _percent(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
