"""nestar_lab: a plugin-based research sandbox for Nested AutoRegressive image generation.

Where things live (each name has one home; import it from there):

- ``nestar_lab.interfaces``: one abstract class per plugin kind and the typed hand-offs.
- ``nestar_lab.method``: the NestAR mechanics (``schedule``, ``flow``, ``capture``, ``losses``,
  ``sample``: THE sampler and ``SampleConfig``, ``generator``: the generator base).
- ``nestar_lab.config``: ``schema`` (``ExperimentConfig``), ``validation`` (``load_config``,
  ``validate_config``), ``overrides``, ``parts``, ``registry`` (``get_registry``), ``errors``.
- ``nestar_lab.run``: ``experiment`` (``build_experiment``), ``train`` (``train``,
  ``load_trained``), ``evaluate``, ``results`` (the pandas results store), ``rundir``, ``data``.
- ``nestar_lab.sweep``: ``study`` (``load_study``), ``tuning`` (``run_study``), ``study_report``,
  ``paired``, ``plots``.
"""

__version__ = "0.1.0"
