"""The runner layer: configs and workdirs above the pure core.

One module per mode (`train`, `sample`, `evaluate`, `edit`, `visualize`), the workdir's files
(`workdir`), config checks composed per mode (`validation`), the model built from a config
(`setup`), runs loaded from workdirs (`loading`), sharded sample generation (`generate`),
sweeps (`sweeps`) and what the command-line programs share (`cli`). Imports only point down:
the core never imports this package.
"""
