"""This machine's matrix-multiply ceiling at the model's shapes: what any runtime's throughput is a share of."""

from __future__ import annotations

import numpy as np

from pipelines.tools.bench.harness import summarize, timed


def matmul_ceiling(seconds: float, shapes: list[tuple[int, int, int]], macs_per_example: int,
                   rounds: int = 5, cores: int = 1) -> dict:
    """This machine's float32 matmul rate at the model's own products (``shapes`` at batch 128, convolutions as
    their im2col products), in examples/s for a model of ``macs_per_example``: the best of numpy, and of torch and
    ONNX Runtime each on every core as one caller and as ``cores`` concurrent callers of one thread (the two ways a
    runtime can use every core).

    Measured exactly as the runtimes are (:func:`timed`, median round), so a runtime's share of it compares like
    with like. It is the float32 ceiling only: int8 kernels do four times the multiply-adds per instruction (VNNI), so
    formats whose arithmetic is int8 get no share of it."""
    import torch

    rng = np.random.default_rng(0)
    mats = [(rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)) for m, k, n in shapes]
    macs = sum(m * k * n for m, k, n in shapes)
    results, spreads = {}, {}
    layouts = [("numpy", np.matmul, lambda a: a, 1), ("torch", torch.matmul, torch.from_numpy, 1)]
    if cores > 1:
        layouts.append((f"torch, {cores} callers x 1 thread", torch.matmul, torch.from_numpy, cores))
    threads = torch.get_num_threads()
    try:
        for name, matmul, wrap, callers in layouts:
            pairs = [(wrap(a), wrap(b)) for a, b in mats]
            torch.set_num_threads(1 if callers > 1 else threads)
            with torch.no_grad():
                summary = summarize(timed(lambda _, matmul=matmul, pairs=pairs: [matmul(a, b) for a, b in pairs],
                                          None, seconds, rounds, callers=callers), 1)
            results[name], spreads[name] = macs * summary["requests_per_s"], summary["spread"]
    finally:
        torch.set_num_threads(threads)
    # ONNX Runtime's own GEMM (MLAS) is faster than torch's at some shapes: a ceiling a runtime exceeds is none
    for callers in sorted({1, cores}):
        name = "onnxruntime" if callers == 1 else f"onnxruntime, {cores} callers x 1 thread"
        summary = summarize(timed(_onnx_matmuls(mats, threads=1 if callers > 1 else cores), None, seconds, rounds,
                                  callers=callers), 1)
        results[name], spreads[name] = macs * summary["requests_per_s"], summary["spread"]
    best_name = max(results, key=results.get)
    return {"macs_per_s": results[best_name], "gflops": 2 * results[best_name] / 1e9, "library": best_name,
            "by_library_gflops": {k: 2 * v / 1e9 for k, v in results.items()}, "spread": spreads[best_name],
            "examples_per_s": results[best_name] / macs_per_example, "shapes": shapes}


def _onnx_matmuls(mats, threads: int):
    """The products alone as one ONNX graph (weights as initializers), run by ONNX Runtime with ``threads``."""
    from onnx import TensorProto, helper, numpy_helper

    from crossport.runtimes import onnx_session

    nodes, inputs, outputs, weights = [], [], [], []
    for index, (left, right) in enumerate(mats):
        inputs.append(helper.make_tensor_value_info(f"a{index}", TensorProto.FLOAT, list(left.shape)))
        outputs.append(helper.make_tensor_value_info(f"c{index}", TensorProto.FLOAT, None))
        weights.append(numpy_helper.from_array(right, f"b{index}"))
        nodes.append(helper.make_node("MatMul", [f"a{index}", f"b{index}"], [f"c{index}"]))
    model = helper.make_model(helper.make_graph(nodes, "products", inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", 13)])
    session = onnx_session(model, threads)
    feeds = {f"a{index}": left for index, (left, _) in enumerate(mats)}
    return lambda _: session.run(None, feeds)
