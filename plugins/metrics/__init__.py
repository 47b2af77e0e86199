"""Built-in metrics."""

from nestar_plugins.metrics.class_accuracy import ClassAccuracy
from nestar_plugins.metrics.diversity import WithinClassDiversity
from nestar_plugins.metrics.fidelity import Fidelity
from nestar_plugins.metrics.nearest_train import NearestTrainDistance
from nestar_plugins.metrics.speed import Speed

from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_metrics():
    return {
        "class_accuracy": ClassAccuracy,
        "nearest_train_distance": NearestTrainDistance,
        "fidelity": Fidelity,
        "speed": Speed,
        "within_class_diversity": WithinClassDiversity,
    }
