"""The speed layer: how update steps run fast, apart from what they compute.

Algorithms hold only their autograd reference step, the definition of the update; this package runs
it, or something equal to it up to float rounding, faster, as the run's :class:`offrl.runtime.Runtime`
says (``fast_paths``, ``precision``, ``compile``, ``cuda_graphs``):

- :mod:`.relu`: the one hand-written forward and backward of relu MLPs and ensembles;
- :mod:`.kernels`: faster forward passes of ``offrl.nets`` modules (relu ensembles; bfloat16 hidden
  layers within update steps), installed on an algorithm's networks;
- :mod:`.hand` and :mod:`.registry`: hand-written update steps, registered per algorithm class
  (:mod:`.bc`, :mod:`.cql_discrete`, :mod:`.sac`);
- :mod:`.runner`: which of those runs an algorithm's step (the base class's ``_run_step`` asks it);
- :mod:`.optim` (fused Adam), :mod:`.compile` (torch.compile), :mod:`.graphs` (CUDA graphs),
  :mod:`.memory` (the allocator, tuned once by ``Runtime.apply``).
"""
