"""What two or more kernel packages share; it imports no kernel package.

* :mod:`~attnrw.kernels.common.shapes`: small tensor helpers (4-D mask
  views, accumulation dtype, GQA expansion, blocking, reductions of
  broadcast gradients);
* :mod:`~attnrw.kernels.common.checks`: the q / k / v / mask input checks,
  worded with each op's own argument names;
* :mod:`~attnrw.kernels.common.layout`: the output layout rule (SDPA's
  (batch, seq, heads, dim) memory order);
* :mod:`~attnrw.kernels.common.dense`: dense attention and its blocked
  backward in pure PyTorch;
* :mod:`~attnrw.kernels.common.spans`: attention over runs of key slots
  (the unit the chunked PyTorch paths compute) and the user mask read at
  the (query, key) pairs a run uses;
* :mod:`~attnrw.kernels.common.autograd`: the registration of an op's
  backward op as its autograd formula;
* :mod:`~attnrw.kernels.common.triton`: the one Triton attend loop and the
  host-side launch helpers (imports triton: only ``triton.py`` modules
  import it).

A kernel package (sparse, condense, merge, attention) imports only from
here, :mod:`attnrw.kernels.dispatch` and itself; ``tests/kernels/test_layering.py``
checks it.
"""
