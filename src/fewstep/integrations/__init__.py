"""Optional integrations. Each submodule imports its third-party library lazily.

* :mod:`fewstep.integrations.diffusers_in`: a diffusers model + scheduler config -> :class:`fewstep.Denoiser`
  (``from_diffusers``, ``load_diffusers``, ``shifted_grid``).
* :mod:`fewstep.integrations.diffusers_scheduler`: ``FewStepScheduler``, any fewstep solver inside an
  unmodified diffusers pipeline.
"""
