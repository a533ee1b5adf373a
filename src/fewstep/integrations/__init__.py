"""Optional integrations. Each submodule imports its third-party library lazily.

* :mod:`fewstep.integrations.diffusers_in`: a diffusers model + scheduler config -> :class:`fewstep.Denoiser`
  (``from_diffusers``, ``shifted_grid``); :mod:`fewstep.integrations.load`: a saved folder (``load_diffusers``).
* :mod:`fewstep.integrations.diffusers_scheduler`: ``FewStepScheduler``, any fewstep solver inside an
  unmodified diffusers pipeline.
"""
