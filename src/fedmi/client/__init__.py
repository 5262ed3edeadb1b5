"""Client end (survey §IV): local trainers that turn global parameters into an `Update`."""

from fedmi.client.trainers import GradientTrainer, LocalTrainer, SGDTrainer, make_trainer

__all__ = ["GradientTrainer", "LocalTrainer", "SGDTrainer", "make_trainer"]
