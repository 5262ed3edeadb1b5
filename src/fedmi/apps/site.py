"""The site side: fedmi's ClientApp. It loads the site's own data, runs the local method with
`train_site` (the loop every fedmi runtime runs) and answers with an `Update` (or metrics); the
data never leaves this process. A method's site state is kept in the node's own Flower context
(`context.state`), so it stays at the site between rounds.

Where the data is: a SuperNode started by `fedmi site` has `data-config` in its node config,
the path of a `SiteConfig` YAML on the site's machine. Such a deployed site checks every task
before it touches its data (`site_guard`): the operator's signature on the run when the node
config names the operator's key (`operator-key`), and always the site's own policy. On Flower's simulation runtime a virtual
node has only `partition-id`; it then takes that site of the run's own `data` section, as every
other fedmi runtime does.
"""

from __future__ import annotations

import json
import logging
import secrets
import zlib
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedmi.apps import site_guard
from fedmi.client import make_method, method_from_spec
from fedmi.core.site_loop import evaluate_site
from fedmi.core import params as P
from fedmi.core.local import State
from fedmi.core.server_state import decode, encode
from fedmi.core.tasks import Task
from fedmi.core.types import RoundInfo, SiteData
from fedmi.errors import FedmiError
from fedmi.experiments.config import DataConfig, SiteConfig, load_yaml_model
from fedmi.experiments.federated_run import federation_for
from fedmi.models import MODELS, build_model
from fedmi.runtime.flower import codec
from fedmi.core.site_loop import train_site

log = logging.getLogger("fedmi")

STOCK_METRICS = ("n", "acc", "loss")


@lru_cache(maxsize=8)
def _load_site(source: str, partition: int | None, seed: int, test_fraction: float, key: int | None
               ) -> tuple[SiteData, Task]:
    """The site's split for this run and its task; `source` is a data-config path or the run's data section (JSON)."""
    if partition is None:
        cfg = _site_config(source)
        fed = federation_for(cfg, seed)
        if cfg.site is None and len(fed.sites) > 1:
            raise FedmiError(f"{source}: dataset {fed.name} holds sites {', '.join(fed.site_names)}; "
                             "say which one is this site's with `site:`")
        name = cfg.site or fed.site_names[0]
    else:
        fed = federation_for(DataConfig.model_validate_json(source), seed)
        if not 0 <= partition < len(fed.sites):
            raise FedmiError(f"partition {partition} does not exist: dataset {fed.name} has {len(fed.sites)} sites")
        name = fed.site_names[partition]
    return fed.split_site(name, seed, test_fraction, key), fed.task


@lru_cache(maxsize=8)
def _site_config(path: str) -> SiteConfig:
    return load_yaml_model(SiteConfig, path, "site data config")


def guard(kind: str, task: dict, context: Context, site: SiteData) -> None:
    """A deployed site's checks of a task (`site_guard`), before its data is used; nothing in simulation."""
    node = context.node_config
    if "data-config" not in node:
        return
    if "operator-key" in node:
        site_guard.check_signed(kind, task, Path(str(node["operator-key"])), Path(str(node["state-dir"])),
                                context.run_id, site.num_train)
    site_guard.check_policy(_site_config(str(node["data-config"])).policy, kind, task, site.num_train)


def site_data(context: Context, task: dict, key: int | None, default_data: DataConfig | None = None
              ) -> tuple[SiteData, Task]:
    node = context.node_config
    seed, test_fraction = int(task.get("seed", 0)), float(task.get("test_fraction", 0.2))
    if "data-config" in node:
        return _load_site(str(node["data-config"]), None, seed, test_fraction, key)
    data = task["data"] if "data" in task else default_data.model_dump() if default_data is not None else None
    if "partition-id" in node and data is not None:
        return _load_site(json.dumps(data), int(node["partition-id"]), seed, test_fraction, key)
    raise FedmiError("this node has no data: start it with `fedmi site --data SITE.yaml` "
                     "(node config data-config=PATH)")


@lru_cache(maxsize=4)
def _model(name: str, input_shape: tuple[int, ...], num_outputs: int, options: str = "{}") -> nn.Module:
    """`options`: the network's arguments as JSON (hashable, for the cache)."""
    return build_model(name, input_shape, 0, num_outputs, json.loads(options))  # weights: the server's


def _model_for(params: P.ParamsT, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The fedmi model whose parameters have these names and shapes (a stock Flower server names none)."""
    for name in MODELS:
        try:
            model = _model(name, input_shape, num_outputs)
        except FedmiError:
            continue
        reference = model.state_dict()
        if list(reference) == list(params) and all(reference[k].shape == params[k].shape for k in reference):
            return model
    raise FedmiError(f"no fedmi model has the parameters the server sent ({', '.join(list(params)[:4])}, ...)")


def _stock_method(config: ConfigRecord):
    """FedAvg's local SGD, with options a stock Flower strategy may put in its train config."""
    options = {k.replace("-", "_"): config[k] for k in ("lr", "batch-size", "local-steps", "local-epochs")
               if k in config}
    return make_method("fedavg", **options)


# The method's site state in the node's context: its tensors, and the JSON skeleton that nests them.
_SITE_STATE, _SKELETON = "fedmi.site-state", "fedmi.site-state.skeleton"
# The state before the last training task, and that task's round: undone when the server says it
# never received that round's update (the site was killed before its reply left, or it came too late).
_BEFORE, _BEFORE_SKELETON, _TRAINED_ROUND = "fedmi.site-state.before", "fedmi.site-state.before.skeleton", \
    "fedmi.site-state.trained-round"


def _kept_state(context: Context) -> State | None:
    record = context.state.array_records.get(_SITE_STATE)
    config = context.state.config_records.get(_SKELETON)
    if record is None or config is None:
        return None
    return decode(json.loads(str(config["skeleton"])), codec.record_params(record, "site state"))


def _drop(context: Context, *keys: str) -> None:
    for key in keys:
        if key in context.state:
            del context.state[key]


def _keep_state(context: Context, state: State | None) -> None:
    if state is None:
        _drop(context, _SITE_STATE, _SKELETON)
        return
    tensors: dict = {}
    skeleton = encode(state, tensors)
    context.state[_SITE_STATE] = codec.params_record(tensors)
    context.state[_SKELETON] = ConfigRecord({"skeleton": json.dumps(skeleton)})


def _copy_state(context: Context, source: tuple[str, str], target: tuple[str, str]) -> None:
    """The state records under `source` (array, skeleton) put under `target` too (cleared if there are none)."""
    _drop(context, *target)
    for src, dst in zip(source, target):
        if src in context.state:
            context.state[dst] = context.state[src]


def _undo_unreceived(context: Context, task: dict) -> None:
    """If the server says it never received this site's last trained update, go back to the state
    before that training (the run's records then say, truly, that this site did not train then);
    what the method says must survive an undo (a privacy budget spent) comes from the state after."""
    trained = context.state.config_records.get(_TRAINED_ROUND)
    if trained is None or "received_round" not in task:
        return
    if int(trained["round"]) > int(task["received_round"]):
        log.warning("round %d: this site's update never reached the server; its state change is undone",
                    int(trained["round"]) + 1)
        after = _kept_state(context)
        _copy_state(context, (_BEFORE, _BEFORE_SKELETON), (_SITE_STATE, _SKELETON))
        if "trainer" in task:
            _keep_state(context, method_from_spec(task["trainer"]).undone(_kept_state(context), after))
    _drop(context, _BEFORE, _BEFORE_SKELETON)  # undone, or received: the old state is not needed
    _drop(context, _TRAINED_ROUND)


def client_app(default_data: DataConfig | None = None) -> ClientApp:
    """fedmi's ClientApp. `default_data`: the federation simulated nodes take their site from
    when a request does not say (a stock Flower strategy's requests carry no fedmi task)."""
    app = ClientApp()

    def request(msg: Message, context: Context, kind: str):
        server_round, task, config = codec.read_task(msg.content)
        if "arrays" not in msg.content.array_records:
            raise FedmiError("the request carries no parameters ('arrays')")
        params = codec.record_params(msg.content["arrays"], "global parameters")  # in the model's order below
        if task is None:  # a stock Flower strategy: this site's key is its name's checksum
            task = {"seed": int(config.get("seed", 0)), "round": (server_round or 1) - 1}
        key = task.get("site_index")
        site, site_task = site_data(context, task, key, default_data)
        guard(kind, task, context, site)
        _undo_unreceived(context, task)
        if key is None:
            key = zlib.crc32(site.name.encode())
        input_shape = tuple(site.x_train.shape[1:])
        model = _model(task["model"], input_shape, site_task.num_outputs,
                       json.dumps(task.get("model_options") or {}, sort_keys=True)) if "model" in task else \
            _model_for(params, input_shape, site_task.num_outputs)
        params = OrderedDict((k, params[k]) for k in model.state_dict() if k in params) | params
        return task, config, params, site, site_task, model, key

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        _, task, _ = codec.read_task(msg.content)
        task = task or {}
        site, site_task = site_data(context, task, task.get("site_index"), default_data)
        guard("query", task, context, site)
        info = ConfigRecord({"name": site.name, "num-train": site.num_train, "num-test": site.num_test,
                             "input-shape": [int(d) for d in site.x_train.shape[1:]],
                             "task": codec.task_json(site_task)})
        if task.get("share_label_counts") and site.info.label_counts is not None:  # the run's method needs them
            info["label-counts"] = list(site.info.label_counts)
        if "partition-id" in context.node_config and "data-config" not in context.node_config:
            info["partition"] = int(context.node_config["partition-id"])  # its position in the simulated federation
        return Message(RecordDict({"site": info}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        task, config, params, site, site_task, model, key = request(msg, context, "train")
        method = method_from_spec(task["trainer"]) if "trainer" in task else _stock_method(config)
        extras = codec.record_params(msg.content[codec.SERVER_EXTRAS], "the server's broadcast") \
            if codec.SERVER_EXTRAS in msg.content.array_records else {}
        round_info = RoundInfo(int(task["round"]), int(task.get("num_rounds", 0)), int(task["seed"]),
                               int(task.get("num_sites", 0)), extras)
        # A deployed site's private randomness (DP-SGD's batches and noise) comes from the OS, fresh for each
        # task: the server, which knows the run's seed, can neither recompute nor replay it.
        private_key = secrets.randbits(63) if "data-config" in context.node_config else None
        update, kept = train_site(method, model, site_task, site, params, _kept_state(context), round_info, key,
                                  private_key=private_key)
        if "received_round" in task:  # the state before, kept until the server says it has this round's update
            _copy_state(context, (_SITE_STATE, _SKELETON), (_BEFORE, _BEFORE_SKELETON))
            context.state[_TRAINED_ROUND] = ConfigRecord({"round": round_info.round})
        _keep_state(context, kept)
        if "trainer" in task:
            return Message(codec.update_content(update, codec.is_packed(msg.content["arrays"])), reply_to=msg)
        # A stock Flower strategy averages local weights, weighted by "num-examples".
        local = P.add(params, update.delta)
        metrics = MetricRecord({"num-examples": update.num_examples, **update.metrics})
        return Message(RecordDict({"arrays": codec.params_record(local), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        task, _, params, site, site_task, model, _ = request(msg, context, "evaluate")
        if "trainer" in task:  # a personalised method evaluates with what it keeps at the site
            params = method_from_spec(task["trainer"]).evaluation_params(params, _kept_state(context))
        metrics = evaluate_site(model, site_task, params, site, task.get("split", "test"))
        if "model" not in task:
            # A stock Flower strategy averages each key over every reply and refuses replies whose keys
            # differ: only what every test set defines (SEN, SPE and AUC need both classes present).
            metrics = {k: metrics[k] for k in STOCK_METRICS}
        record = MetricRecord({("num-examples" if k == "n" else k): v for k, v in metrics.items() if v is not None})
        return Message(RecordDict({"metrics": record, "site": ConfigRecord({"name": site.name})}), reply_to=msg)

    return app


app = client_app()  # the component Flower's deployment runtime loads (`fedmi submit`)
