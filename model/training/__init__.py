"""UniRS fine-tuning: dataset readers and mixture, collation, the SFT loop, offline clue generation.

Command lines: `unirs-train` (`model.training.cli:train_main`) and `unirs-clues`
(`model.training.cli:clues_main`). The trainer and clue generator are imported lazily so that
`--help` and dataset validation do not pay for importing the model stack.
"""

from .data import (
    DEFAULT_REPEATS,
    DatasetFormatError,
    DatasetSpec,
    InterleavedSampler,
    MixtureDataset,
    Record,
    interleave_evenly,
    load_dataset_records,
    parse_dataset_spec,
)

__all__ = [
    "DEFAULT_REPEATS",
    "DatasetFormatError",
    "DatasetSpec",
    "InterleavedSampler",
    "MixtureDataset",
    "Record",
    "TrainConfig",
    "generate_clue_file",
    "interleave_evenly",
    "load_dataset_records",
    "parse_dataset_spec",
    "train",
]


def __getattr__(name: str):
    if name in ("TrainConfig", "train"):
        from . import trainer

        return getattr(trainer, name)
    if name == "generate_clue_file":
        from .clues import generate_clue_file

        return generate_clue_file
    raise AttributeError(name)
