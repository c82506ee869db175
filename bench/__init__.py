"""Benchmarks of miss_ext against its floor (the frozen ``nn.Linear``) and its peer (PEFT's MiSS).

Run ``python -m bench --help`` from the repository root. Modules, one job each:

* :mod:`bench.cases`       - the shape suites (default, llm, smoke) and the case list;
* :mod:`bench.contestants` - floor / PEFT / miss_ext modules on one shared base and block;
* :mod:`bench.timing`      - interleaved (round-robin) timing, medians, CUDA events;
* :mod:`bench.memory`      - bytes saved by autograd (saved_tensors_hooks), CUDA peak memory;
* :mod:`bench.costmodel`   - docs/MATH.md section 8's flop model (the ideal ratio to the floor);
* :mod:`bench.accuracy`    - errors against ``miss_ext.reference`` (in float64) and PEFT;
* :mod:`bench.layer_bench` - the one-layer suite (rows of numbers);
* :mod:`bench.train_bench` - a training step on a small Llama built in code (config, model, batches);
* :mod:`bench.train_preset` - the training benchmark: presets (step, large, metamathqa), the frozen,
  PEFT, inject, patch and LoRA rows, timed in interleaved rounds;
* :mod:`bench.train_floor` - the model-level floor rows (frozen step + unavoidable per-layer parts);
* :mod:`bench.floor`       - the one-layer floor from measured parts (``python -m bench floor``);
* :mod:`bench.serving_bench` - mixed-adapter serving batches (``python -m bench serve``);
* :mod:`bench.outputs`     - result paths and comma-list arguments;
* :mod:`bench.progress`    - the optional progress bar;
* :mod:`bench.profile`     - per-operator torch.profiler breakdown of a case;
* :mod:`bench.report`      - aligned text table, CSV and PNG;
* :mod:`bench.env`         - torch version, device, threads, git commit, date;
* :mod:`bench.cli`         - the command line (``python -m bench``).
"""

import logging

# peft imports torchao and bitsandbytes when installed, which log "Failed to load ..." WARNING
# lines about optional native pieces on every import: noise in every benchmark run.
for _name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .cli import main, run  # noqa: E402

__all__ = ["main", "run"]
