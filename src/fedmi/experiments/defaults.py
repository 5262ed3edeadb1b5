"""One training recipe per kind of data: the model and local optimiser a run gets where its
config, `fedmi table2`'s options or `fedmi.run`'s arguments name none. `fedmi run`, `fedmi table2`
and the Python API all take them from here.

- tables: logistic regression and each local method's own optimiser (FedAvg's: SGD at lr 0.05, 10
  local steps of batch 32, the survey's Table II);
- images: ResNet-18 at a quarter of its width, Adam at lr 0.001, one local pass a round, the
  learning rate divided by 10 at 50% and 75% of training (MedMNIST's recipe);
- masks (segmentation): a U-Net, with the images' optimiser.
"""

from __future__ import annotations

from typing import Any

from fedmi.client import METHODS
from fedmi.data.federation import Federation

TABULAR = {"model": "logistic", "model_options": {}, "trainer": {}}  # the local methods' own defaults
IMAGE = {"model": "resnet18", "model_options": {"widen_factor": 0.25},
         "trainer": {"optimizer": "adam", "lr": 0.001, "local_epochs": 1, "lr_milestones": [0.5, 0.75]}}
SEGMENTATION = {**IMAGE, "model": "unet", "model_options": {}}
DEFAULT_LR = {"sgd": 0.05, "adam": 0.001}  # an optimiser named without a learning rate gets its own


def recipe(fed: Federation) -> dict:
    """The recipe for `fed`'s kind of data: {"model", "model_options", "trainer": optimiser options}."""
    if fed.kind != "image":
        return TABULAR
    return SEGMENTATION if fed.task.name == "segmentation" else IMAGE


def model_defaults(fed: Federation, model: str | None, model_options: dict | None) -> tuple[str, dict]:
    """(model, options): those given, else the recipe's. A model named by the user takes no default options.

    Example::

        model_defaults(breastmnist, None, None)    # ("resnet18", {"widen_factor": 0.25})
        model_defaults(breastmnist, "cnn", None)   # ("cnn", {})
    """
    base = recipe(fed)
    if model_options is not None:
        return model or base["model"], dict(model_options)
    return (base["model"], dict(base["model_options"])) if model in (None, base["model"]) else (model, {})


def trainer_defaults(fed: Federation, method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The local method's options: `given` (None values: not given) over the recipe's optimiser
    options. An optimiser named without `lr` takes its own learning rate and no schedule;
    `local_steps` named without `local_epochs` replaces the recipe's passes. A method without a
    local optimiser of its own (FedSGD's one full-batch gradient, a wrapper) takes only `given`.

    Example::

        trainer_defaults(breastmnist, "fedprox", {"mu": 0.1})
        # {"optimizer": "adam", "lr": 0.001, "local_epochs": 1, "lr_milestones": [0.5, 0.75], "mu": 0.1}
    """
    given = {k: v for k, v in given.items() if v is not None}
    if getattr(METHODS.get(method), "default_budget", None) is None:
        return given
    out = dict(recipe(fed)["trainer"])
    if "optimizer" in given and given["optimizer"] != out.get("optimizer", "sgd"):
        if "lr" in out:
            out["lr"] = DEFAULT_LR.get(given["optimizer"], out["lr"])
        out.pop("lr_milestones", None)
    if "local_steps" in given and "local_epochs" not in given:
        out.pop("local_epochs", None)
    return {**out, **given}


SHOWN = ("optimizer", "lr", "momentum", "batch_size", "local_steps", "local_epochs", "lr_milestones", "mu")


def describe_recipe(model: str, model_options: dict, method: str, options: dict[str, Any]) -> str:
    """One line naming what a run trains, from the model and the built method's options.

    Example::

        describe_recipe("resnet18", {"widen_factor": 0.25}, "fedavg", make_method("fedavg").options())
        # 'model resnet18 (widen_factor 0.25); trainer fedavg: sgd, lr 0.05, batch size 32, local steps 10'
    """
    shown = ", ".join(f"{k} {v}" for k, v in model_options.items())
    parts = [str(options["optimizer"])] if "optimizer" in options else []
    parts += [f"{k.replace('_', ' ')} {', '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
              for k in SHOWN[1:] if (v := options.get(k)) not in (None, [], (), 0, 0.0)]
    return f"model {model}{f' ({shown})' if shown else ''}; trainer {method}: {', '.join(parts) or 'its defaults'}"
