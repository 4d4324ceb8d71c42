"""Input and output: Parquet lakes, model directories, checkpoints and reports.

Modules
-------
filesystem   local paths and fsspec URLs; directories published all or nothing
lake         Parquet lakes bucketed by cluster id, and reading any Parquet dataset
artifacts    model directories (manifest, learner, random effects) and their integrity checks
checkpoint   atomic checkpoints of the EM loop, to resume a killed fit
report       the HTML report of a fitted model (convergence, caterpillar and importance plots)
"""
