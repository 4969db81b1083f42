"""``python -m pipelines.bench VERSION --peers``: crossport side by side with the converters users would pick instead.

Each peer (:data:`PEERS`) lives in an environment of its own, created from the pinned requirements in ``peers/``
(their pins conflict with onnx-tf's, and onnx2tf needs Python 3.12); its converter runs there in a fresh process
(``peers/convert_<name>.py``), timed whole, with its imports reported on their own, in interleaved rounds (a single
conversion's time moved by 1.7× from one run to the next: onnx2tf's MobileNetV3-small took 2.82 s once, 1.61-1.72 s
in four rounds after). Every file it makes is then
run here, on the same LiteRT: size, Transposes, batch-1 latency and batch-128 throughput in interleaved rounds, and
crossport's gate (:mod:`pipelines.tools.check`): error against the exact float64 values, the sign test, top-1
agreement with the reference, accuracy. A peer that cannot be installed or cannot convert is a row saying why.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossport.interface import SCORES
from pipelines.tools.bench.harness import ROOT, over_rounds, paired, summarize, timed

log = logging.getLogger("crossport.bench")


@dataclass(frozen=True)
class Peer:
    name: str
    python: str | None  # the interpreter its environment is made from (None: crossport's own, no environment)
    source: str  # what it converts: "onnx" (the run's graph) or "pytorch" (the module, from the checkpoint)

    @property
    def requirements(self) -> Path | None:
        return None if self.python is None else ROOT / "peers" / f"{self.name}.txt"

    @property
    def script(self) -> Path:
        return ROOT / "peers" / f"convert_{self.name.replace('-', '_')}.py"


PEERS = (
    Peer("crossport", None, "onnx"),
    Peer("onnx2tf", "python3.12", "onnx"),
    Peer("litert-torch", "python3.11", "pytorch"),
)


def environments_dir() -> Path:
    return Path(os.environ.get("CROSSPORT_PEERS_DIR") or Path.home() / ".cache" / "crossport" / "peers")


def environment(peer: Peer, install: bool) -> Path:
    """The peer's interpreter, its environment made (once per requirements file) when ``install``; RuntimeError with
    the reason when it cannot be had."""
    if peer.python is None:
        return Path(sys.executable)
    home = environments_dir() / peer.name
    python, stamp, ours = home / "bin" / "python", home / ".installed", home / ".made-by-crossport"
    wanted = peer.requirements.read_text()
    if stamp.is_file() and stamp.read_text() == wanted:
        return python
    if not install:
        raise RuntimeError(f"not installed in {home} (make peers installs it)")
    if home.exists() and not ours.is_file() and any(home.iterdir()):  # remade only when crossport made it
        raise RuntimeError(f"{home} holds files crossport did not write; set CROSSPORT_PEERS_DIR to another folder")
    base = interpreter(peer.python)
    if base is None:
        raise RuntimeError(f"this machine has no {peer.python} that runs, which {peer.name} needs")
    log.info("installing %s into %s ...", peer.name, home)
    for command in ([base, "-m", "venv", "--clear", str(home)],
                    [str(python), "-m", "pip", "install", "--quiet", "-r", str(peer.requirements)]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[-3:])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        ours.touch()  # from the moment the environment exists: a failed install may be remade
    stamp.write_text(wanted)
    return python


def interpreter(name: str) -> str | None:
    """The first ``name`` (e.g. ``python3.12``) that runs: on the PATH, or else one of pyenv's installed versions (its
    shim on the PATH answers "command not found" unless that version is active)."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = [shutil.which(name), *sorted(map(str, pyenv.glob(f"*/bin/{name}")), reverse=True)]
    for candidate in filter(None, found):
        try:
            done = subprocess.run([candidate, "-c", "import sys; print(sys.executable)"], capture_output=True,
                                  text=True, timeout=60)
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return None


def calibration_file(run_dir: Path, shape: tuple[int, ...], path: Path) -> Path:
    """An ``.npy`` of the inputs the run calibrated its own full int8 file with, [N, *SHAPE] in [0, 1], at ``path``:
    every converter's int8 is calibrated alike."""
    from crossport.files import read_npz
    from crossport.interface import to_inputs

    images = read_npz(run_dir / "calibration.npz", redo="data", need=("images",))["images"]
    np.save(path, to_inputs(images).reshape(len(images), *shape))
    return path


def convert(peer: Peer, python: Path, run_dir: Path, shape: tuple[int, ...], calibration: Path, out: Path) -> dict:
    """The peer's converter in a fresh process, every script given the same arguments (REPO SOURCE LABELS SHAPE
    OUT CALIBRATION; each takes what it needs; CALIBRATION: :func:`calibration_file`). An ONNX source is a copy:
    onnx2tf rewrites the file it is given. The script prints one JSON line: ``files`` (kind: path), ``failed``
    (kind: why, for a file it meant to make and could not; optional), ``import_s``, ``convert_s`` and ``quantize_s``.
    A script that fails as a whole is a RuntimeError with its last line."""
    out.mkdir(parents=True)
    source = run_dir / "model.pt"
    if peer.source == "onnx":
        source = out / "model.onnx"
        shutil.copyfile(run_dir / "model.onnx", source)
    args = [str(ROOT), str(source), str(run_dir / "labels.txt"), ",".join(map(str, shape)), str(out),
            str(calibration)]
    started = time.perf_counter()
    done = subprocess.run([str(python), str(peer.script), *args], capture_output=True, text=True, cwd=out,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"conversion failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    made = json.loads(done.stdout.strip().splitlines()[-1])
    return {**made, "wall_s": wall}


def compare_peers(version_dir: Path, run_dir: Path, *, install: bool, quick: bool) -> dict:
    """Every peer's files, converted and measured side by side (the module's docstring)."""
    from crossport.errors import CrossportError
    from export.layout import placement, tflite_ops
    from export.servable import image_contract
    from pipelines.tools.check import check

    shape = image_contract(version_dir).shape
    rows, files, errors = [], [], {}
    with tempfile.TemporaryDirectory(prefix="crossport-peers-") as scratch:
        calibration = calibration_file(run_dir, shape, Path(scratch) / "calibration.npy")
        runs = _conversions(run_dir, shape, calibration, Path(scratch), install, 1 if quick else CONVERSION_ROUNDS)
        for peer in PEERS:
            row = {"peer": peer.name, "source": peer.source}
            rows.append(row)
            if isinstance(runs[peer.name], Exception):
                row["error"] = str(runs[peer.name])
                log.warning("%s: %s", peer.name, runs[peer.name])
                continue
            made = runs[peer.name][0]  # the files the first round made are the ones measured
            row.update(_medians(runs[peer.name]))
            if peer != PEERS[0] and not isinstance(runs[PEERS[0].name], Exception):
                row["conversion_vs_crossport"] = _converting_over(runs[PEERS[0].name], runs[peer.name])
            row["files"] = {}
            for kind, path in made["files"].items():
                path = Path(path)
                squared: dict = {}
                try:
                    report = check(path, run_dir, converted_from=peer.source, squared=squared)
                except CrossportError as error:  # e.g. a file LiteRT cannot run: said in its row
                    said = error.message.replace(str(path), path.name)  # the scratch folder is gone afterwards
                    row["files"][kind] = {"kind": kind, "bytes": path.stat().st_size, "error": said}
                    log.warning("%s %s: %s", peer.name, kind, error.message)
                    continue
                hop, (exact,) = report["hops"][0], report["against_exact"]
                entry = {"kind": report["kind"], "declared": kind, "bytes": path.stat().st_size,
                         "input": report["input"], "verdict": report["verdict"],
                         "transposes": placement(tflite_ops(path))["transposes"],
                         "top1_agreement": hop["top1_agreement"], "accuracy": hop["candidate_accuracy"],
                         "reference_accuracy": hop["reference_accuracy"],
                         "accuracy_drop": hop.get("accuracy_drop"),
                         "exact": {o["name"]: {"max_abs": o["max_abs"], "rms": o["rms"],
                                               "sign_statistic": o.get("sign_statistic")} for o in exact["outputs"]},
                         "sign_threshold": exact.get("threshold")}
                row["files"][kind] = entry
                files.append((peer.name, entry, path))
                errors[(peer.name, kind)] = squared.get(SCORES)
            for kind, why in made.get("failed", {}).items():  # after the files it made, as the table lists them
                row["files"][kind] = {"kind": kind, "error": f"{peer.name} could not make it: {why}"}
                log.warning("%s %s: %s", peer.name, kind, why)
        _latencies(files, shape, quick)
    _errors(files, errors)
    return {"version_dir": str(version_dir), "run_dir": str(run_dir), "quick": quick, "peers": rows}


CONVERSION_ROUNDS = 3  # each converter's fresh process, round after round (one with --quick)


def _conversions(run_dir: Path, shape: tuple[int, ...], calibration: Path, scratch: Path, install: bool,
                 rounds: int) -> dict:
    """Each peer's conversion :func:`convert` ``rounds`` times, every peer's round r before any peer's round r + 1 (a
    slow spell of the machine then falls on every converter of a round alike): peer name → the rounds' results,
    each with ``whole_s``, its float conversion's whole process; or the error that stopped its first round, which
    its row says. A later round that fails is left out of the figures."""
    runs: dict = {}
    for round_ in range(rounds):
        for peer in PEERS:
            if isinstance(runs.get(peer.name), Exception):
                continue
            try:
                python = environment(peer, install and round_ == 0)
                made = convert(peer, python, run_dir, shape, calibration, scratch / peer.name / str(round_))
            except (RuntimeError, OSError, ValueError) as error:
                if round_ == 0:
                    runs[peer.name] = error
                else:
                    log.warning("%s, conversion round %d: %s", peer.name, round_ + 1, error)
                continue
            runs.setdefault(peer.name, []).append({**made, "round": round_,
                                                   "whole_s": made["wall_s"] - made.get("quantize_s", 0.0)})
    return runs


def _medians(conversions: list[dict]) -> dict:
    """A converter's figures over its rounds: each the median, and how many rounds there were."""

    def median(key: str) -> float:
        return float(np.median([run[key] for run in conversions]))

    return {"conversion_wall_s": median("whole_s"), "import_s": median("import_s"), "convert_s": median("convert_s"),
            "quantize_s": median("quantize_s") if "quantize_s" in conversions[0] else None,
            "conversion_rounds": len(conversions)}


def _converting_over(ours: list[dict], theirs: list[dict]) -> dict | None:
    """crossport's conversion after its imports (TensorFlow's above all) ÷ the peer's whole conversion process, within
    each round both converted in: the median and range over those rounds."""
    mine = {run["round"]: run["convert_s"] for run in ours}
    ratios = [mine[run["round"]] / run["whole_s"] for run in theirs if run["round"] in mine]
    return over_rounds(ratios) if ratios else None


def _errors(files: list, errors: dict) -> None:
    """A peer's scores error against the exact values beside crossport's file of the same kind, example by example
    (:func:`crossport.parity.error_ratio`): the RMS ratio and bounds at crossport's confidence."""
    from crossport.parity import error_ratio

    for peer, entry, _ in files:
        theirs, ours = errors.get((peer, entry["declared"])), errors.get((PEERS[0].name, entry["declared"]))
        if peer != PEERS[0].name and theirs is not None and ours is not None:
            ratio = error_ratio(theirs, ours)
            if ratio is not None:
                entry["exact"]["scores"]["vs_crossport"] = ratio


def _latencies(files: list, shape: tuple[int, ...], quick: bool) -> None:
    """Batch-1 latency and batch-128 throughput of every file, in interleaved rounds (every file's round r runs
    before any file's round r + 1), one LiteRT thread per call as a served worker runs it; a peer's file beside
    crossport's file of the same kind, round by round (:func:`pipelines.tools.bench.harness.paired`)."""
    from crossport.foreign import inspect, load

    rounds, seconds = (3, 0.3) if quick else (7, 1.0)
    rng = np.random.default_rng(0)
    batches = {1: rng.random((1, *shape), dtype=np.float32), 128: rng.random((128, *shape), dtype=np.float32)}
    read = [inspect(path) for _, _, path in files]
    runners = [load(foreign, shape, threads=1) for foreign in read]
    measured: dict = {(i, b): [] for i in range(len(files)) for b in batches}
    for _ in range(rounds):
        for index, run in enumerate(runners):
            for batch, images in batches.items():
                if batch > 1 and read[index].batch:
                    continue  # a fixed batch of one answers 128 images one by one: not a batch-128 figure
                measured[(index, batch)] += timed(run, images, seconds, rounds=1)
    ours = {entry["declared"]: index for index, (peer, entry, _) in enumerate(files) if peer == PEERS[0].name}
    for index, (peer, entry, _) in enumerate(files):
        for batch in batches:
            found = measured[(index, batch)]
            entry[f"batch{batch}"] = summarize(found, batch) if found else None
            mine = measured.get((ours.get(entry["declared"]), batch))
            if found and mine and peer != PEERS[0].name:
                entry[f"batch{batch}"]["vs_crossport"] = paired(found, mine, batch)


def render_peers(results: dict) -> str:
    """The side-by-side table: one row per file. Errors are against the exact float64 values; a file returning logits
    alone has its scores computed from them in float64 (crossport.foreign.softmax); sign T is the larger of its
    outputs', against the threshold in the gate column. Conversion is the float files' whole fresh process (in
    brackets its imports, and the conversion after them), the median of interleaved rounds; a peer's carries, in
    brackets, crossport's conversion after its imports ÷ this whole process within each round (median, range): below
    1, crossport converts faster once TensorFlow is loaded. An int8 row says what its converter took for the int8
    files after that. The accuracy drop is in points against the reference, with the gate's one-sided upper bound.
    A peer's latency and throughput carry, in brackets, their ratio to crossport's file of the same kind within each
    round: the median over the rounds and their range; its scores RMS, its ratio to that file's with bounds that each
    hold at crossport's confidence, the test images being the draws (:func:`crossport.parity.error_ratio`)."""
    columns = ("converter", "file", "input",
               "conversion s: process (imports + converting), median of the rounds (crossport's converting ÷ this "
               "process)", "size kB", "Transposes",
               "batch-1 p50 ms (÷ crossport's per round: median, range)", "batch-128 images/s (÷ crossport's)",
               "scores max \\|err\\|", "scores RMS (÷ crossport's, bounds)", "logits max \\|err\\|", "sign T",
               "top-1 agreement", "accuracy", "accuracy drop, points (upper)", "gate")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    blank = " |" * (len(columns) - 3)
    for row in results["peers"]:
        if "error" in row:
            lines.append(f"| {row['peer']} | — | {row['error']} |" + blank)
            continue
        for entry in row["files"].values():
            if "error" in entry:
                lines.append(f"| {row['peer']} | {entry['kind']} | {entry['error']} |" + blank)
                continue
            scores, logits = entry["exact"].get("scores", {}), entry["exact"].get("logits", {})
            one, many = entry.get("batch1"), entry.get("batch128")
            signs = [o["sign_statistic"] for o in (scores, logits) if o.get("sign_statistic") is not None]
            threshold = f" (t {entry['sign_threshold']:.2f})" if entry.get("sign_threshold") else ""
            conversion = (f"+{row['quantize_s']:.2f} (int8 files)"
                          if entry["declared"].startswith("int8") and row.get("quantize_s") is not None
                          else f"{row['conversion_wall_s']:.2f} ({row['import_s']:.2f} + {row['convert_s']:.2f})"
                          + _against(row.get("conversion_vs_crossport")))
            drop = entry.get("accuracy_drop")
            cells = [row["peer"], entry["kind"], entry["input"].split(", ", 1)[1], conversion,
                     f"{entry['bytes'] / 1e3:.0f}", str(entry["transposes"]),
                     f"{one['p50_ms']:.3f}{_against(one.get('vs_crossport'))}" if one else "—",
                     (f"{many['examples_per_s']:,.0f}{_against(many.get('vs_crossport'))}" if many
                      else "— (fixed batch)"),
                     _number(scores.get("max_abs")),
                     _number(scores.get("rms")) + _against(scores.get("vs_crossport"), "ratio"),
                     _number(logits.get("max_abs")),
                     f"{max(signs):.2f}" if signs else "—", f"{entry['top1_agreement']:.4%}",
                     f"{entry['accuracy']:.2%}",
                     f"{100 * drop['estimate']:.2f} (≤ {100 * drop['upper']:.2f})" if drop else "—",
                     entry["verdict"] + threshold]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _against(ratio: dict | None, point: str = "median") -> str:
    """`` (×ratio, low–high)``: a peer's figure ÷ crossport's (nothing for crossport's own, which has none)."""
    return f" (×{ratio[point]:.2f}, {ratio['low']:.2f}–{ratio['high']:.2f})" if ratio else ""


def _number(value) -> str:
    return "—" if value is None else f"{value:.2e}"


def files_of(results: dict) -> list[tuple[str, dict]]:
    """Every measured file as (``converter kind``, its entry), in table order."""
    return [(f"{row['peer']} {kind}", entry) for row in results["peers"] for kind, entry in row.get("files", {}).items()
            if "error" not in entry]


def render_peers_chart(results: dict, path: Path) -> None:
    """Conversion time (fresh process, imports shaded), batch-1 latency, and scores RMS error against the exact
    values, per file."""
    from pipelines.reports import pyplot

    plt = pyplot()
    files = files_of(results)
    names = [name for name, _ in files]
    walls = {row["peer"]: row for row in results["peers"] if "error" not in row}
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 0.5 * len(names) + 1.8))
    left.barh(names, [walls[name.split()[0]]["conversion_wall_s"] for name in names], color="#3b6ea8",
              label="whole process")
    left.barh(names, [walls[name.split()[0]]["import_s"] for name in names], color="#9bb8d9", label="imports")
    left.set_xlabel("conversion, s")
    left.legend(fontsize=8)
    middle.barh(names, [entry["batch1"]["p50_ms"] if entry.get("batch1") else 0 for _, entry in files],
                color="#2e8b57")
    middle.set_xlabel("batch-1 latency p50, ms")
    right.barh(names, [entry["exact"].get("scores", {}).get("rms", 0) for _, entry in files], color="#c0392b")
    right.set_xscale("log")
    right.set_xlabel("scores RMS error vs exact float64 (log)")
    for axis in (middle, right):
        axis.set_yticklabels([])
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
