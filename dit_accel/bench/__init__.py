"""``dit-accel bench``: every supported family at its published size, timed as a new user would run it.

Modules: ``models`` (the eight published configs, tiny CPU twins, the builder and the FLOP estimate), ``runs``
(the configurations: stock, stock with cuDNN, each preset and its attention-only and cache-only parts, the peers;
compiled variants), ``peers`` (diffusers' and cache-dit's caches tuned to our cache's compute fraction,
FlexAttention with our masks, SageAttention), ``timing`` (CUDA-event timing of generations, steps, attention
calls and planning; peak memory), ``runner`` (the budgeted, interleaved loop and ``bench.json``), ``report``
(JSON, PNG grid, markdown table), ``testbed`` (the presets' quality and speed on the testbed), ``cli``.

Nothing heavy is imported here: ``dit_accel.cli`` imports ``dit_accel.bench.cli`` to add the subcommand.
"""
