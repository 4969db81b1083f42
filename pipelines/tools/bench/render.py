"""The benchmark's results for people: bench.md, compare.md, bench.png and the recommendations."""

from __future__ import annotations

from pathlib import Path


def render_comparison(results: list[dict]) -> str:
    """Models side by side per format: accuracy, batch-1 latency (and its ratio to ONNX Runtime), throughput, size."""
    lines = ["| format | " + " | ".join(
                 f"{r['model']}: accuracy / batch-1 p50 ms (× ORT) / batch-128 ex/s / MB" for r in results) + " |",
             "|---|" + "---|" * len(results)]
    names = [name for name in results[0]["runtimes"] if all(name in r["runtimes"] for r in results)]
    for name in names:
        cells = []
        for r in results:
            info, ort = r["runtimes"][name], r["runtimes"].get("onnxruntime")
            ratio = info["batch1"]["p50_ms"] / ort["batch1"]["p50_ms"] if ort else float("nan")
            accuracy = info.get("test_accuracy")
            cells.append(f"{'-' if accuracy is None else f'{accuracy:.2%}'} / {info['batch1']['p50_ms']:.3f} "
                         f"({ratio:.2f}×) / {info['batch128']['examples_per_s']:,.0f} / "
                         f"{(info['artifact_bytes'] or 0) / 1e6:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| model | MACs per example | ceiling (ex/s) |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['macs_per_example']:,} | {r['ceiling']['examples_per_s']:,.0f} |" for r in results]
    return "\n".join(lines) + "\n"


def render_markdown(results: dict) -> str:
    ceiling = results["ceiling"]
    cores = next(iter(results["runtimes"].values()), {}).get("threads", results["machine"]["cpus"])
    lines = [f"Benchmark of `{results['version_dir']}` on {results['date'][:10]} ({results['machine']['cpus']} CPUs"
             f"{', quick' if results['quick'] else ''}). Ceiling: {ceiling['gflops']:.1f} GFLOP/s float32 matmul "
             f"({ceiling['library']}) at the model's shapes = {ceiling['examples_per_s']:,.0f} examples/s "
             f"(spread {100 * ceiling.get('spread', 0):.0f} %). Throughput is the median of "
             f"{next(iter(results['runtimes'].values()))['batch128'].get('rounds', 1)} timed rounds after a warm-up; "
             "spread: (max - min) / median of the rounds.", "",
             f"| runtime | batch 1 p50 / p99 (ms) | batch 1 ex/s | batch 128 req/s | batch 128 ex/s (spread) "
             f"| batch 128 ex/s, {cores} callers x 1 thread (spread) | % of ceiling (best of the two) "
             "| batch 128 ex/s, 1 thread | cold start (s) | peak RSS (MB) | artifact (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, info in results["runtimes"].items():
        cold = info["cold_start"]
        cold_s = f"{cold['median_s']:.2f}" if cold else "-"
        rss = f"{cold['peak_rss_mb']:.0f}" if cold else "-"
        share = (f"{100 * info['ceiling_share']:.0f} %" if info.get("ceiling_share") is not None
                 else f"({info.get('arithmetic', 'int8')}: not comparable)")
        one_thread, callers = info.get("batch128_one_thread"), info.get("batch128_callers")
        single = f"{one_thread['examples_per_s']:,.0f}" if one_thread else "-"
        parallel = f"{callers['examples_per_s']:,.0f} ± {100 * callers['spread']:.0f} %" if callers else "-"
        lines.append(
            f"| {name} | {info['batch1']['p50_ms']:.3f} / {info['batch1']['p99_ms']:.3f} | "
            f"{info['batch1']['examples_per_s']:,.0f} | {info['batch128']['requests_per_s']:,.0f} | "
            f"{info['batch128']['examples_per_s']:,.0f} ± {100 * info['batch128']['spread']:.0f} % | {parallel} | "
            f"{share} | "
            f"{single} | {cold_s} | {rss} | "
            f"{(info['artifact_bytes'] or 0) / 1e6:.2f} |")
    layouts = {name: info["layout"] for name, info in results["runtimes"].items() if info.get("layout")}
    if layouts:
        lines += ["", "Transpose ops (between convolutions): " + ", ".join(
            f"{name} {layout['transposes']} ({layout['between_convs']})" for name, layout in layouts.items())]
    lines += ["", "| serverless package | unzipped (MB) | zipped (MB) | + runtime installed (MB) | cold start (s) |",
              "|---|---|---|---|---|"]
    for variant, info in results["serverless"].items():
        lines.append(f"| {variant} | {info['unzipped_bytes'] / 1e6:.2f} | {info['zipped_bytes'] / 1e6:.2f} | "
                     f"{info['runtime_bytes'] / 1e6:.0f} | {info['cold_start']['median_s']:.2f} |")
    lines += ["", "| web service backend | protocol | workers | clients | batch | req/s | ex/s | % of in process | "
                  "p50 (ms) | p99 (ms) | server CPU per request (ms) | clients' CPU per request (ms) | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cpu(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def bracket(pair: list | None) -> str:  # bench.json written before the call was timed on both sides has none
        return f" ({pair[0]:.2f}–{pair[1]:.2f})" if pair else ""

    for row in (row for row in results["http"] if not row.get("cost")):
        share = f"{100 * row['in_process_share']:.0f} %" if row.get("in_process_share") is not None else "-"
        lines.append(f"| {row['backend']} | {row.get('protocol', 'rest')} | {row.get('workers', 1)} | "
                     f"{row['clients']} | {row['batch']} | "
                     f"{row['requests_per_s']:,.0f} | {row['examples_per_s']:,.0f} | {share} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} | {cpu(row.get('server_cpu_ms_per_request'))} | "
                     f"{cpu(row.get('client_cpu_ms_per_request'))} | {row['errors']} |")
    cost = [row for row in results["http"] if row.get("cost")]
    if cost:
        lines += ["", f"What a request costs beyond the model (gRPC, batch 128, {cost[0]['workers']} server "
                      "process(es), 2 clients; `grpc_uint8`: the same pixels as 0-255 to `predict_uint8`):", "",
                  "| backend | input | bytes per request | ex/s | server CPU per request (ms) | the model's own call "
                  "(CPU ms: mean, before–after the loads) | server ÷ model |", "|---|---|---|---|---|---|---|"]
        for row in cost:
            ratio = row.get("server_cpu_over_model")
            lines.append(f"| {row['backend']} | {'uint8' if row['protocol'] == 'grpc_uint8' else 'float32'} | "
                         f"{row['request_bytes']:,} | {row['examples_per_s']:,.0f} | "
                         f"{cpu(row.get('server_cpu_ms_per_request'))} | {cpu(row.get('model_cpu_ms_per_call'))}"
                         f"{bracket(row.get('model_cpu_ms_before_after'))} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}×'} |")
    stages = results["pipeline_stage_wall_s"]
    lines += ["", "Pipeline stages (s): " + ", ".join(f"{k} {v}" for k, v in stages.items())]
    peaks = {k: v for k, v in results.get("pipeline_stage_peak_rss_gib", {}).items() if v is not None}
    if peaks:  # runs made before stages recorded their peaks have none
        lines.append("Pipeline run's peak memory after each stage (GiB, its process): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()))
    advice = recommendations(results)
    if advice:
        lines += ["", "Recommendation on this machine (every format listed passed the parity gate):", *advice]
    return "\n".join(lines) + "\n"


def render_chart(results: dict, path: Path) -> None:
    from pipelines.reports import pyplot

    plt = pyplot()
    names = list(results["runtimes"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.barh(names, [results["runtimes"][n]["batch128_all_cores"] for n in names], color="#3b6ea8")
    left.axvline(results["ceiling"]["examples_per_s"], color="#c0392b", linestyle="--", label="matmul ceiling")
    left.set_xscale("log")
    left.set_xlabel("examples/s at batch 128, every core (log)")
    left.legend(fontsize=8)
    right.barh(names, [results["runtimes"][n]["batch1"]["p50_ms"] for n in names], color="#2e8b57")
    right.set_xlabel("batch-1 latency p50, ms")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def recommendations(results: dict) -> list[str]:
    """One line per goal: the format that serves it best here, with what it costs in accuracy."""
    runtimes = {name: info for name, info in results["runtimes"].items() if name != "pytorch"}
    if not runtimes:
        return []

    def accuracy(name: str) -> str:
        value = runtimes[name].get("test_accuracy")
        return f", test accuracy {value:.2%}" if value is not None else ""

    fastest = min(runtimes, key=lambda n: runtimes[n]["batch1"]["p50_ms"])
    busiest = max(runtimes, key=lambda n: runtimes[n]["batch128_all_cores"])
    smallest = min(runtimes, key=lambda n: runtimes[n]["artifact_bytes"] or float("inf"))
    return [f"- lowest latency: {fastest} ({runtimes[fastest]['batch1']['p50_ms']:.3f} ms p50 at batch 1"
            f"{accuracy(fastest)})",
            f"- highest throughput: {busiest} ({runtimes[busiest]['batch128_all_cores']:,.0f} ex/s at "
            f"batch 128, {runtimes[busiest]['all_cores_layout']}{accuracy(busiest)})",
            f"- smallest: {smallest} ({(runtimes[smallest]['artifact_bytes'] or 0) / 1e6:.2f} MB{accuracy(smallest)})"]

