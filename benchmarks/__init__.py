"""Benchmarks for maxmin-jax: `python -m benchmarks.run --suite cpu|gpu --out results.json`.

One job per module: `timing` (warm-up, synchronisation, repeats, median and IQR), `registry` (where benchmarks
register), `ceilings` (matmul peak and memory bandwidth measured in the same run), `costs` (FLOPs and bytes a
model must spend), `env` (hardware and versions), `report` (JSON and the printed table), and the benchmarks
themselves (`lm`: CPU forward and sampling against transformers; `rl`: E-step and PPO iteration; `gpu`: MFU,
decode bandwidth and the PPO iteration on a GPU), and a tool (`profile`: time per XLA op of one call). METHOD.md
says how every figure is computed.
"""
