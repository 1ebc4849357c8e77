"""Data: dataset definitions, readers, label budgets, training streams and evaluation volumes."""
from .budget import LabelBudget, split_labeled
from .datasets import DATASETS, Case, DatasetSpec, build_dataset
from .loaders import EvalVolume, StepBatches, Stream, eval_volumes, train_loader, volume_loader
from .readers import CorruptFileError, DataError
from .store import CaseStore
from . import shift  # registers the dataset 'simulated_shift'

__all__ = ["DATASETS", "Case", "CaseStore", "CorruptFileError", "DataError", "DatasetSpec", "EvalVolume",
           "LabelBudget", "StepBatches", "Stream", "build_dataset", "eval_volumes", "split_labeled", "train_loader",
           "volume_loader"]
