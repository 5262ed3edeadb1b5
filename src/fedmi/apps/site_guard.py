"""What a deployed site checks before it touches its data: the operator's signature on the run,
that the task asks exactly what was signed, and the hospital's own policy (`SitePolicy`).

A refusal raises a FedmiError whose message starts with "refused:" and names the rule; the site
logs it and answers with that error, and the server logs it under the site's name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedmi.apps import tickets
from fedmi.client import METHODS
from fedmi.errors import FedmiError
from fedmi.experiments.config import SitePolicy, parse_config
from fedmi.experiments.federated_run import build_method


def _plain(value: object) -> object:
    return json.loads(json.dumps(value))  # tuples as lists, as they travel


# Methods that train as the method they wrap and only bound or withhold what leaves the site: a policy
# that allows a method allows it under these. Any other wrapper must be in the policy itself.
RELEASE_BOUNDS = ("dp_clip", "dp_sgd", "partial_sharing")


def trainer_chain(spec: dict) -> list[dict]:
    """The trainer descriptions from the outermost wrapper (`options.inner`) to the method that trains."""
    chain = [spec]
    while isinstance(inner := chain[-1].get("options", {}).get("inner"), dict):
        chain.append(inner)
    return chain


def samples_and_steps(spec: dict, num_train: int) -> tuple[int, int, int]:
    """(batch size, optimiser steps, distinct training samples at most) behind one update of the
    method `spec` describes (through its wrappers), at a site of `num_train` training samples."""
    options = trainer_chain(spec)[-1].get("options", {})
    batch = options.get("batch_size")
    batch = num_train if batch is None else min(int(batch), num_train)
    if options.get("local_epochs"):
        steps = int(options["local_epochs"]) * math.ceil(num_train / max(batch, 1))
        return batch, steps, num_train
    steps = int(options.get("local_steps") or 1)
    return batch, steps, min(num_train, batch * steps)


def check_policy(policy: SitePolicy, kind: str, task: dict, num_train: int) -> None:
    """Refuse a task the site's policy does not allow (see `SitePolicy`)."""
    if policy.models is not None and task.get("model") not in policy.models:
        raise FedmiError(f"refused: model {task.get('model')!r} is not in this site's policy (models: "
                         f"{', '.join(policy.models)})")
    if policy.max_rounds is not None and int(task.get("num_rounds", 0)) > policy.max_rounds:
        raise FedmiError(f"refused: the run has {task['num_rounds']} rounds, more than this site's policy allows "
                         f"(max_rounds: {policy.max_rounds})")
    if kind == "query" and task.get("share_label_counts") and not policy.share_label_counts:
        raise FedmiError("refused: the run asks for the site's label counts, which its policy does not share "
                         "(share_label_counts: false)")
    spec = task.get("trainer")
    if spec is None:
        return
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise FedmiError("refused: the task's trainer is not a fedmi trainer description")
    chain = trainer_chain(spec)
    if policy.methods is not None:
        names = [s.get("name") for s in chain[:-1] if s.get("name") not in RELEASE_BOUNDS] + [chain[-1].get("name")]
        for name in names:
            if name not in policy.methods:
                raise FedmiError(f"refused: method {name!r} is not in this site's policy (methods: "
                                 f"{', '.join(policy.methods)})")
    if kind != "train":
        return
    batch, steps, samples = samples_and_steps(spec, num_train)
    if batch < min(policy.min_batch_size, num_train):
        raise FedmiError(f"refused: batches of {batch} samples, fewer than this site's policy allows "
                         f"(min_batch_size: {policy.min_batch_size})")
    if steps < policy.min_local_steps:
        raise FedmiError(f"refused: {steps} local steps, fewer than this site's policy allows "
                         f"(min_local_steps: {policy.min_local_steps})")
    if samples < min(policy.min_samples_per_update, num_train):
        raise FedmiError(f"refused: an update from {samples} training samples, fewer than this site's policy "
                         f"allows (min_samples_per_update: {policy.min_samples_per_update})")


def _expected_method(cfg, asked: object, num_train: int):
    """The trainer the signed config makes. With DP-SGD calibrated to a target ε the server chose the
    noise for the site that spends most: the site takes the task's noise multiplier if it is at
    least what keeps this site within the target (its own size, the signed rounds), and refuses less."""
    privacy = cfg.privacy
    if privacy is None or privacy.level != "sample" or privacy.noise_multiplier is not None:
        return build_method(cfg)
    own = build_method(cfg, [num_train])
    options = asked.get("options", {}) if isinstance(asked, dict) else {}
    z = options.get("noise_multiplier")
    if not isinstance(z, (int, float)) or z < own.noise_multiplier * (1 - 1e-6):
        raise FedmiError(f"refused: the task's DP-SGD noise multiplier ({z!r}) is below {own.noise_multiplier:.4g}, "
                         f"which keeps this site within the signed target_epsilon {privacy.target_epsilon:g}")
    return build_method(cfg.model_copy(update={"privacy": privacy.model_copy(
        update={"noise_multiplier": float(z), "target_epsilon": None})}))


def check_signed(kind: str, task: dict, public_key_path: Path, state_dir: Path, run_id: int, num_train: int) -> None:
    """Refuse a task whose run the operator did not sign, whose ticket belongs to another run, or
    that asks anything other than the signed configuration says."""
    ticket = tickets.verify(tickets.load_public_key(public_key_path), task.get(tickets.TICKET),
                            task.get(tickets.SIGNATURE))
    tickets.bind(state_dir, ticket, run_id)
    cfg = parse_config(ticket.config, "the signed run config")
    signed = {"seed": cfg.seed, "test_fraction": cfg.data.test_fraction, "model": cfg.model,
              "model_options": _plain(cfg.model_options)}
    if kind != "query" or "model" in task:
        for key, value in signed.items():
            if _plain(task.get(key)) != value:
                raise FedmiError(f"refused: the task's {key} ({task.get(key)!r:.80}) is not the signed run's "
                                 f"({value!r:.80})")
    if task.get("share_label_counts") and not METHODS.get(cfg.trainer.name).needs_label_distribution:
        raise FedmiError("refused: the task asks for label counts that the signed run's method does not use")
    if "trainer" in task:
        expected = _plain(_expected_method(cfg, task["trainer"], num_train).spec())  # with the signed privacy
        if _plain(task["trainer"]) != expected:
            raise FedmiError("refused: the task's trainer is not the signed run's (it asks "
                             f"{json.dumps(task['trainer'])[:200]})")
    if kind == "train":
        if int(task.get("num_rounds", -1)) != cfg.rounds or not 0 <= int(task.get("round", -1)) < cfg.rounds:
            raise FedmiError(f"refused: round {task.get('round')} of {task.get('num_rounds')} is not within the "
                             f"signed run's {cfg.rounds} rounds")
