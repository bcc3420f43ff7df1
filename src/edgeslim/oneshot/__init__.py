"""One-shot compression of big models, layer by layer, in bounded memory.

One-shot methods for transformers (Wanda, SparseGPT, GPTQ, SmoothQuant) need statistics of
each linear layer's *inputs* on a little calibration data. Running the whole model with hooks
on every layer would hold every layer's statistics (a Hessian of ``in x in`` floats each) and
all activations at once. Instead, as in the GPTQ/SparseGPT reference code, the model is
processed one transformer block at a time::

    inputs of block 0  <- run the calibration batches up to block 0, then stop
    for each block i:
        run block i on its inputs with hooks          -> statistics of its linear layers
        compress each layer of block i from them      (the algorithm's job)
        run the compressed block i on the same inputs -> inputs of block i + 1

so the peak memory is about one block, its statistics and the activations of the calibration
set at one depth. Errors of block i are seen by block i + 1 (sequential, as in the papers).

Modules, one idea each:

- :mod:`.linear`     the linear view: which modules are linear layers, their weight as (out, in)
- :mod:`.stats`      statistics of a layer's inputs (||X_j||^2, H = 2/n X^T X, max|X_j|)
- :mod:`.blocks`     finding the blocks of a model and the calibration inputs that reach them
- :mod:`.registry`   how an algorithm plugs in: its interface and config -> algorithm table
- :mod:`.engine`     the block-by-block engine and its per-layer loop (:func:`.engine.one_shot_`)
- :mod:`.streaming`  the same, reading and writing blocks from safetensors shards

The algorithms (:mod:`edgeslim.prune.wanda`, :mod:`edgeslim.prune.sparsegpt`,
:mod:`edgeslim.quant.gptq`, :mod:`edgeslim.quant.smoothquant`) register themselves with
:func:`.registry.register`; nothing here imports them. This package imports none of its
modules eagerly, so that low modules (``models/hf.py``) can use :mod:`.linear` alone.
"""
