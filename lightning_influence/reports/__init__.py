"""Reports of an `InfluenceResult`: tables, image grids, histograms and scalars for loggers and on disk
(`write.py`), per-example facts for the dashboard (`examples.py`), and TensorBoard's INFLUENCE tab
(`dashboard.py`, imported by TensorBoard through the `tensorboard_plugins` entry point)."""

from lightning_influence.reports.examples import ExampleStore, label_text, save_examples
from lightning_influence.reports.images import as_image
from lightning_influence.reports.write import write_reports

__all__ = ["ExampleStore", "as_image", "label_text", "save_examples", "write_reports"]
