"""Embedded demos: models and data that ship with the package, so every view works offline.

* ``multiviz_widgets.demos.easy_vqa``: a small image + question model trained on easy-VQA (the
  dataset comes from the ``easy-vqa`` package; the weights are in ``demos/weights/``).
  ``easy_vqa.load(split="test") -> (adapter, dataset)``.
* ``multiviz_widgets.demos.synthetic``: tabular + time-series tasks with a planted interaction.

The submodules are imported on demand (``from multiviz_widgets.demos import easy_vqa``), so
importing this package costs nothing.
"""

__all__ = ["easy_vqa", "synthetic"]
