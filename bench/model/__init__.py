"""End-to-end model benchmark: ``python -m bench.model``.

A Llama-3-8B-shaped Hugging Face Llama (random weights, a few layers) timed for a training
step and a decode step with three RMSNorms (Hugging Face's own, ``accel_torch`` through
``replace_rmsnorm``, Liger-Kernel's), and a Flax nnx transformer of the same shape with
``accel_jax.nnx.RMSNorm`` against ``flax.nnx.RMSNorm``. Step time, peak memory and the
share of the step's device time spent in the norm. On a CPU it runs tiny configs.
"""
