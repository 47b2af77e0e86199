"""Built-in metrics."""

from nestar_lab.hookspecs import hookimpl
from nestar_plugins.metrics.class_accuracy import ClassAccuracy
from nestar_plugins.metrics.nearest_train import NearestTrainDistance


@hookimpl
def nestar_register_metrics():
    return {"class_accuracy": ClassAccuracy, "nearest_train_distance": NearestTrainDistance}
