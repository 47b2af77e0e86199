"""Built-in run loggers, each an optional extra: ``pip install 'nestar-lab[tensorboard]'``
(likewise ``wandb``, ``mlflow``). They register whether or not their package is installed; a
config that names one whose package is missing fails before any work, naming the extra."""

from nestar_plugins.loggers.mlflow_logger import MlflowLogger
from nestar_plugins.loggers.tensorboard_logger import TensorBoardLogger
from nestar_plugins.loggers.wandb_logger import WandbLogger

from nestar_lab.hookspecs import hookimpl


@hookimpl
def nestar_register_loggers():
    return {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}
