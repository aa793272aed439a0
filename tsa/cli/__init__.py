"""The command-line tools: option parsing and checking, printing and exit codes, around the library.

    tsa-train  (tsa.cli.train)   options / YAML / preset -> TrainConfig -> tsa.training.train
    tsa-cache  (tsa.cli.cache)   the same options -> tsa.training.precompute_cache
    tsa-sample (tsa.cli.sample)  -> tsa.sampling.sample
    tsa-viz    (tsa.cli.viz)     -> tsa.viz

A user's mistake ends a tool with one line on stderr, `PROG: error: MESSAGE`, and exit status 2; a broken run
(non-finite loss, bad checkpoint) with one line and exit status 1; success with 0. Each module runs as
`python -m tsa.cli.NAME` (and `accelerate launch -m tsa.cli.train`).
"""
