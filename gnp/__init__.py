"""gnp: grow-and-prune incremental learning (Dai, Yin and Jha, 2019).

The library the gnpd daemon calls with tensors; it knows nothing of Kafka or HTTP.
"""

from gnp.cost import Cost
from gnp.data import ChunkedData, Data, Dataset, Samples, load_dataset
from gnp.masks import Masks, ParamCount, count_parameters
from gnp.models import MODELS, ModelSpec, build_model
from gnp.policies import METHODS, Schedule, UpdateResult, update
from gnp.prune import PruneConfig
from gnp.tasks import CLASSIFICATION, Classification, Task
from gnp.train import Abandoned, TrainConfig, TrainingDiverged, evaluate

__all__ = [
    "Abandoned", "CLASSIFICATION", "ChunkedData", "Classification", "Cost", "Data", "Dataset",
    "MODELS", "METHODS", "Masks", "ModelSpec", "ParamCount", "PruneConfig", "Samples",
    "Schedule", "Task", "TrainConfig", "TrainingDiverged", "UpdateResult", "build_model",
    "count_parameters", "evaluate", "load_dataset", "update",
]
