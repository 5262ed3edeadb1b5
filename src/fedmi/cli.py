"""The `fedmi` command: `table2`, `run`, `datasets`.

User errors (FedmiError, bad options) print one or two lines and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from fedmi.deploy.pins import DEFAULT_SITE_POLL
from fedmi.errors import FedmiError, counted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated learning for medical image analysis.")
# Outside a terminal (pipes, CI logs) rich would assume 80 columns and squeeze the tables.
out_console = Console() if sys.stdout.isatty() else Console(width=130)
err_console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=130)


def _option(default, *decls: str, help: str, **kwargs):
    """A typer option whose default is written in its help text, in plain words: typer's own
    "[default: ...]" is escaped for rich markup and shows a stray backslash outside it."""
    if default is not ... and default is not None and default is not False and default != []:
        # a comma-joined default gets spaces, so that a narrow terminal can wrap it
        shown = ", ".join(map(str, default)) if isinstance(default, list) else str(default).replace(",", ", ")
        help = f"{help} (default: {shown})"
    return typer.Option(default, *decls, help=help, show_default=False, **kwargs)


class _Once(logging.Filter):
    """Show each distinct warning once (a single-class site warns in every repeat)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _setup_logging(verbose: bool, log_format: str | None = None) -> None:
    """fedmi's log lines: on stderr for a person; for a service (`fedmi server`, `fedmi site`:
    `log_format` "text" or "json") on stdout with its children's relayed lines, each with its time
    or as one JSON object a line, from INFO up."""
    log = logging.getLogger("fedmi")
    log.handlers.clear()
    if log_format is not None:
        from fedmi.deploy.processes import JsonLogFormatter, set_log_format

        set_log_format(log_format)
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonLogFormatter() if log_format == "json" else
                             logging.Formatter("%(asctime)s fedmi %(levelname)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
        verbose = True
    else:
        handler = RichHandler(console=err_console, show_time=False, show_path=False)
    handler.addFilter(_Once())
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False

    def as_fedmi_warning(message, category, filename, lineno, file=None, line=None) -> None:
        """A library's warning (numpy overflow, a missing glyph) as one fedmi line, without its source path."""
        log.warning("%s (%s)", " ".join(str(message).split())[:300], category.__name__)

    warnings.showwarning = as_fedmi_warning


def _progress() -> Progress:
    """A progress display on stderr (elapsed, estimate of the rest); none when stderr is not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), console=err_console, transient=True,
                    disable=not err_console.is_terminal)


def _dataset_option_fields() -> dict[str, tuple[str, type, str]]:
    """Every registered dataset's options (but `path`, given as NAME:PATH): name -> (flag, type, help)."""
    from typing import get_args

    from fedmi.data import DATASETS

    found: dict[str, tuple[str, type, str, list[str]]] = {}
    for ds in DATASETS:
        for name, field in DATASETS.get(ds).Options.model_fields.items():
            extra = field.json_schema_extra or {}
            if name == "path" or extra.get("cli") is False:  # NAME:PATH, or settings only a config file gives
                continue
            args = [a for a in get_args(field.annotation) if a is not type(None)] or [field.annotation]
            kind = args[0] if args[0] in (int, float, bool) else str  # Literal choices travel as text
            flag = "--" + (extra.get("cli") or name).replace("_", "-")
            entry = found.setdefault(name, (flag, kind, field.description or "", []))
            entry[3].append(ds)
    return {name: (flag, kind, f"{text} ({', '.join(which)})") for name, (flag, kind, text, which) in found.items()}


def _with_dataset_options(command):
    """Give `command` one option per dataset option (derived from the datasets' own models); they
    arrive in its **dataset_options, None where not given."""
    import inspect

    if getattr(command, "_with_dataset_options", False):
        return command
    command._with_dataset_options = True
    signature = inspect.signature(command)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for name, (flag, kind, text) in _dataset_option_fields().items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                                        default=typer.Option(None, flag, help=text, show_default=False)))
    command.__signature__ = signature.replace(parameters=params)
    return command


def _yaml_mapping(text: str | None, flag: str) -> dict:
    from fedmi.experiments.config import parse_yaml

    value = parse_yaml(text, flag) if text else {}
    if not isinstance(value, dict):
        raise FedmiError(f"{flag}: give a YAML mapping such as '{{channels: [8, 16]}}', got {text!r}")
    return value


def _numbers(text: str | None, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise FedmiError(f"{flag}: give comma-separated numbers such as 0.5,0.75, got {text!r}") from None


def _data_from_config(config: Path):
    """(the data section, the whole run config or None) of a run config or a bare data config."""
    from fedmi.experiments.config import DataConfig, parse_config, read_yaml, validated

    raw = read_yaml(config, "config")  # read once, validated as what it is
    if raw is None:
        raise FedmiError(f"{config} is empty: give a data section (data: {{dataset: ...}}) or a dataset")
    if not isinstance(raw, dict):
        raise FedmiError(f"{config}: a config must be a mapping of fields, got {type(raw).__name__}")
    if "data" in raw:
        run_config = parse_config(raw, str(config))
        return run_config.data, run_config
    return validated(DataConfig, raw, str(config)), None


@app.command()
def table2(
    config: Optional[Path] = typer.Argument(None, help="a run config (its data section, and its model if it names "
                                                       "one) or a data config: the same data `fedmi run` takes"),
    dataset: Optional[str] = _option(None, help="a dataset (fedmi datasets), csv:PATH or npz:PATH, instead of "
                                                "CONFIG (default: heart-disease)"),
    methods: str = _option("cross,single,mix,fedavg,fedsgd,fedprox", help="comma-separated settings"),
    repeats: int = _option(5, help="random 80/20 splits per site (training seeds on a fixed split)"),
    rounds: int = _option(100, help="federated rounds"),
    epochs: int = _option(100, help="training passes of the centralised settings"),
    model: Optional[str] = _option(None, help="a model (fedmi models; default: logistic for tables, resnet18 "
                                              "at width 0.25 for images, unet for masks)"),
    model_options: Optional[str] = _option(None, help="the model's arguments as a YAML mapping, e.g. "
                                                      "'{channels: [8, 16, 32], strides: [2, 2]}'"),
    optimizer: Optional[str] = _option(None, help="the local optimiser of every setting: sgd or adam "
                                                  "(default: sgd for tables, adam for images)"),
    lr: Optional[float] = _option(None, help="local learning rate (default: 0.05 with sgd, 0.001 with adam)"),
    momentum: float = _option(0.0, help="local SGD momentum"),
    weight_decay: float = _option(0.0, help="L2 penalty added to the gradient"),
    lr_milestones: Optional[str] = _option(None, help="fractions of training at which the learning rate is "
                                                      "multiplied by 0.1, e.g. 0.5,0.75 (default for images)"),
    batch_size: int = _option(32, help="samples per local step"),
    local_steps: Optional[int] = _option(None, help="FedAvg's and FedBN's local steps per round (default 10 for "
                                                    "tables)"),
    local_epochs: Optional[int] = _option(None, help="FedAvg's and FedBN's local passes per round instead "
                                                     "(default 1 for images)"),
    fedsgd_lr: float = _option(1.0, help="FedSGD's server step size"),
    method_options: Optional[str] = _option(None, help="per setting, its step's (or local method's) options as "
                                                       "YAML, e.g. '{fedadam: {lr: 0.01}, qffl: {q: 2}}'"),
    test_fraction: float = _option(0.2, help="each site's share held out as its own test split (random splits)"),
    privacy: Optional[str] = _option(None, help="differential privacy in every federated setting, as a run config's "
                                     "privacy: YAML mapping, e.g. '{level: sample, clip_norm: 1.0, target_epsilon: 8}'"),
    small_sites: Optional[str] = _option(None, help="a site too small to split: refuse (the default) or leave_out "
                                                    "(run without it, with a warning)"),
    val_fraction: float = _option(0.0, help="hold this share of each site's training data out for validation and "
                                            "report each setting's model from its best round there (MedMNIST's rule)"),
    validation: bool = _option(False, "--validation", help="train and score on each site's training data only, "
                                                           "part held out for validation: choose settings here, "
                                                           "never on the test split"),
    standardize: bool = _option(False, "--standardize", help="z-score features per site with the site's own "
                                                               "training statistics (default: tabular data only)"),
    no_standardize: bool = _option(False, "--no-standardize", help="never z-score features"),
    augment: Optional[str] = _option(None, help="augmentation of training batches at the sites, as YAML, e.g. "
                                               "'{flip: [0, 1], rotate90: true, intensity: 0.1}'"),
    seed: int = _option(0, help="seed of splits, initial weights and batch order (0 to 2^63-1)"),
    runtime: str = _option("auto", help="auto, sequential, vectorised or processes (how sites are simulated)"),
    device: str = _option("cpu", help="where the sites compute: cpu, cuda, cuda:N, mps or auto (CUDA if present)"),
    out: Optional[Path] = _option(None, help="output folder (default runs/table2-DATASET)"),
    resume: Optional[Path] = _option(None, help="continue the interrupted protocol in this folder, with the "
                                                     "settings it was started with"),
    overwrite: bool = _option(False, "--overwrite", help="replace the results already in the output folder, "
                                                              "once this protocol finishes"),
    verbose: bool = _option(False, "--verbose", "-v", help="log every round and every decision"),
    **dataset_options,
) -> None:
    """Run the survey's Table II protocol (Cross, Single, Mix, FedAvg, FedSGD, FedProx) and report it; --methods
    takes every federated setting fedmi has (fedmi methods lists them).

    The dataset options below come from the datasets themselves; each applies to the datasets named after it."""
    _setup_logging(verbose)
    from fedmi.data import dataset_options as check_options
    from fedmi.experiments.config import DataConfig, validated
    from fedmi.experiments.defaults import describe_recipe
    from fedmi.experiments.federated_run import federation_for
    from fedmi.experiments.outputs import TABLE2_SETTINGS, UNITS, JsonlWriter, check_output, output_folder
    from fedmi.experiments.report import rich_table, table_notes, write_table2_report
    from fedmi.experiments.table2 import ProtocolFolder, Table2Config, run_table2, training_defaults, work_units

    if resume is not None:
        if out is not None or overwrite:
            raise FedmiError("fedmi table2: --resume continues in its own folder; --out and --overwrite do not apply")
        check_output(resume, "resume", "fedmi table2 --resume", settings=TABLE2_SETTINGS)
        saved, cfg = ProtocolFolder(resume).settings()
        data = DataConfig(**saved)
        fed = federation_for(data, cfg.seed, cfg.test_fraction)
        target, mode = resume, "resume"
    else:
        given = {k: v for k, v in dataset_options.items() if v is not None}
        flags = _dataset_option_fields()
        run_config = None
        if config is not None:
            data_flags = [flags[k][0] for k in given] + [f for f, v in (("--dataset", dataset), ("--augment", augment),
                          ("--standardize", standardize), ("--no-standardize", no_standardize),
                          ("--small-sites", small_sites)) if v]
            if data_flags:
                raise FedmiError(f"fedmi table2: {', '.join(data_flags)} and CONFIG both describe the data; "
                                 f"set it in {config}'s data section")
            data, run_config = _data_from_config(config)
        else:
            dataset = dataset or "heart-disease"
            try:
                check_options(dataset, given, where="option")
            except FedmiError as e:  # name the flag the user typed
                text = str(e)
                for name in given:
                    text = text.replace(f"option '{name}'", f"option {flags[name][0]}")
                raise FedmiError(f"fedmi table2: {text}") from None
            if standardize and no_standardize:
                raise FedmiError("fedmi table2: give --standardize or --no-standardize, not both")
            data = validated(DataConfig, {"dataset": dataset, "augment": _yaml_mapping(augment, "--augment") or None,
                                          "standardize": True if standardize else False if no_standardize else None,
                                          **({"small_sites": small_sites} if small_sites else {}),
                                          **given}, "fedmi table2", prefix="option ")
        fed = federation_for(data, seed, test_fraction)
        if model is None and run_config is not None and run_config.model is not None:
            model = run_config.model  # the run config's own network, with its options
            model_options = model_options or (json.dumps(run_config.model_options) if run_config.model_options
                                              else None)
        given_options = {"model": model, "optimizer": optimizer, "lr": lr, "local_steps": local_steps,
                         "local_epochs": local_epochs, "model_options": _yaml_mapping(model_options, "--model-options")
                         if model_options else None,
                         "lr_milestones": _numbers(lr_milestones, "--lr-milestones") if lr_milestones else None}
        cfg = Table2Config(
            methods=[m.strip().lower() for m in methods.split(",") if m.strip()], repeats=repeats, rounds=rounds,
            epochs=epochs, seed=seed, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
            fedsgd_lr=fedsgd_lr, runtime=runtime, device=device, validation=validation, val_fraction=val_fraction,
            test_fraction=test_fraction,
            method_options=_yaml_mapping(method_options, "--method-options") or {},
            privacy=_yaml_mapping(privacy, "--privacy") if privacy else  # else the run config's own
            (run_config.privacy.model_dump(mode="json", exclude_defaults=True) if run_config and run_config.privacy
             else None),
            **training_defaults(fed, given_options),
        )
        target = out or Path("runs") / f"table2-{fed.name.replace(':', '-')}"
        mode = "overwrite" if overwrite else "new"
    if fed.synthetic:
        err_console.print(f"[bold yellow]SYNTHETIC DATA:[/] {fed.description}")
    err_console.print(describe_recipe(cfg.model, cfg.model_options, "of every setting",
                                      {"optimizer": cfg.optimizer, "lr": cfg.lr, "batch_size": cfg.batch_size,
                                       **({"local_epochs": cfg.local_epochs} if cfg.local_epochs else
                                          {"local_steps": cfg.local_steps}), "lr_milestones": cfg.lr_milestones}),
                      highlight=False, soft_wrap=True)
    with output_folder(target, mode, "fedmi table2 --resume {}", TABLE2_SETTINGS, UNITS) as path:
        folder = ProtocolFolder(path, metadata={"dataset": fed.name, "model": cfg.model})
        if mode != "resume":
            folder.save_settings(data.model_dump(mode="json"), cfg)
        with JsonlWriter(path / "metrics.jsonl") as sink, _progress() as progress:
            task = progress.add_task(f"{fed.name}: {', '.join(cfg.methods)}", total=work_units(fed, cfg))
            rounds_task = progress.add_task("federated round", total=cfg.rounds, visible=False)
            result = run_table2(
                fed, cfg, sink=sink,
                advance=lambda k, note: progress.update(task, advance=k, description=f"{fed.name} {note}"),
                on_round=lambda r: progress.update(rounds_task, completed=r, visible=r < cfg.rounds),
                completed=folder.completed_units(), on_unit=folder.keep,
            )
        write_table2_report(result, path, models=False)  # the folder kept each model as it was made
    out_console.print(rich_table(result))
    for note in table_notes(result):
        out_console.print(note, style="bold yellow" if note.startswith("WARNING") else None, highlight=False)
    out_console.print(f"wrote {target}/: " + ", ".join(sorted(p.name for p in target.iterdir())))


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML file describing one federated run"),
    out: Optional[Path] = _option(None, help="output folder (default: the config's `out`, else runs/NAME)"),
    resume: Optional[Path] = _option(None, help="continue the interrupted run in this folder from its last "
                                                     "checkpoint (its own config.yaml; no CONFIG)"),
    overwrite: bool = _option(False, "--overwrite", help="replace the run already in the output folder, "
                                                              "once this one finishes"),
    runtime: Optional[str] = _option(None, help="override the config's runtime: auto, sequential, vectorised, "
                                                     "processes or flower-sim"),
    workers: Optional[int] = _option(None, help="processes: worker processes; flower-sim: concurrent clients"),
    device: Optional[str] = _option(None, help="override the config's device: cpu, cuda, cuda:N, mps or auto"),
    verbose: bool = _option(False, "--verbose", "-v", help="log every round and every decision"),
) -> None:
    """One federated training run described by a YAML config; `--resume RUN_DIR` continues an interrupted one."""
    _setup_logging(verbose)
    from fedmi.experiments.config import load_config
    from fedmi.experiments.federated_run import privacy_line, run_federated
    from fedmi.experiments.outputs import RUN_CONFIG, check_output, output_folder
    if (config is None) == (resume is None):
        raise FedmiError("fedmi run: give a config file to start a run, or --resume RUN_DIR to continue one")
    if resume is not None and (out is not None or overwrite):
        raise FedmiError("fedmi run: --resume continues the run in its own folder; --out and --overwrite do not apply")
    overrides = {k: v for k, v in (("runtime", runtime), ("workers", workers), ("device", device)) if v is not None}
    if resume is not None:
        check_output(resume, "resume", "fedmi run --resume")
        cfg, target, mode = load_config(resume / RUN_CONFIG, overrides), resume, "resume"
    else:
        cfg = load_config(config, overrides)
        target = out or Path(cfg.out or Path("runs") / config.stem)
        mode = "overwrite" if overwrite else "new"
    name = config.stem if config else target.name
    announce = lambda line: err_console.print(line, highlight=False, soft_wrap=True)  # noqa: E731
    with output_folder(target, mode, "fedmi run --resume {}") as folder, _progress() as progress:
        continuing = mode == "resume"  # without a readable checkpoint this stops, and nothing is replaced
        task = progress.add_task(f"{name}: {cfg.trainer.name}, round", total=cfg.rounds)
        advance = lambda r: progress.update(task, completed=r)  # noqa: E731
        if cfg.runtime == "flower-sim":
            from fedmi.apps.simulation import run_flower_simulation

            done = run_flower_simulation(cfg, folder, advance, resume=continuing, announce=announce)
        else:
            done = run_federated(cfg, folder, on_round=advance, resume=continuing, announce=announce)
    fed = done.federation
    title = f"{cfg.trainer.name} on {fed.name}" + (" (SYNTHETIC DATA)" if fed.synthetic else "")
    _print_final(f"{title}: after {counted(cfg.rounds, 'round')}", fed.task.table_metrics, done.result.history[-1]["test"],
                 fed.task.name, fed.label_names)
    last = done.result.history[-1]
    if cfg.privacy is not None and (line := privacy_line(last, cfg.privacy)):
        out_console.print(line, highlight=False, soft_wrap=True)
    if not fed.has_fixed_split:
        from fedmi.experiments.table2 import METHODS as SETTINGS

        source = config if config else target / RUN_CONFIG
        methods = f" --methods single,{cfg.trainer.name}" if cfg.trainer.name in SETTINGS else ""
        out_console.print(f"note: one random split of each site is one sample; for mean ± std over repeated "
                          f"splits: fedmi table2 {source}{methods}", highlight=False, soft_wrap=True)
    out_console.print(f"wrote {target}/: " + ", ".join(sorted(p.name for p in target.iterdir())))


def _print_final(title: str, metrics: Sequence[str], final: dict[str, dict], task: str,
                 label_names: Sequence[str] | None = None) -> None:
    """The final model's test metrics per site, with the positive class and one-class warnings under them."""
    from fedmi.experiments.report import class_note

    table = Table(title=title)
    for col in ("Site", "test n", *(m.upper() for m in metrics)):
        table.add_column(col, justify="left" if col == "Site" else "right")
    for site, m in final.items():
        table.add_row(site, str(m.get("n", "?")), *("n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in metrics))
    out_console.print(table)
    names = list(label_names or [])
    named = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
    notes = [class_note(task, names)] + [
        f"WARNING: at {site} the model predicts one class ({named(m['one_class'])}) for every test case"
        for site, m in final.items() if m.get("one_class") is not None]
    for note in filter(None, notes):
        out_console.print(note, style="bold yellow" if note.startswith("WARNING") else None, highlight=False)


_CONNECTION_HELP = "the server's HOST:PORT"


def _connection(server: str, ca: Optional[Path], insecure: bool, state: Optional[Path] = None):
    """`state`: the server's state folder, for the operator's commands (its token opens the Control API)."""
    from fedmi.deploy.connection import Connection

    if insecure == (ca is not None):
        raise FedmiError("give the CA certificate (--ca ca.pem) for TLS, or --insecure (loopback only)")
    return Connection(server, None if insecure else ca, state)


_STATE_HELP = "the server's state folder (as `fedmi server --state`): its operator token opens the server"


@app.command()
def certs(
    out: Path = _option(Path("pki"), help="folder to write the keys and certificates into"),
    site: list[str] = _option(..., "--site", help="a site's name (repeat for each site)"),
    host: list[str] = _option(["127.0.0.1", "localhost"], "--host",
                                   help="a name or IP address the server is reached by (repeat)"),
    days: int = _option(365, min=1, help="validity of the certificates"),
) -> None:
    """Make a CA, the server's TLS certificate and one key pair per site (for `fedmi server/site`)."""
    from fedmi.deploy.certs import make_certificates

    make_certificates(out, site, host, days)
    out_console.print(f"wrote {out}/: ca.pem, server.pem + server.key (server only; valid for {', '.join(host)}), "
                      f"operator.key (server only: signs each run) + operator.pub (to every site with ca.pem), "
                      f"sites/NAME.key (that site only) + sites/NAME.pub (enrol at the server) for {', '.join(site)}. "
                      "Keep ca.key offline.")


@app.command()
def server(
    certs: Optional[Path] = _option(None, help="folder from `fedmi certs` (ca.pem, server.pem, server.key)"),
    enroll: list[Path] = _option([], "--enroll", help="a site's public key to admit (repeat)"),
    host: str = _option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = _option(9092, min=1, max=65535, help="port to listen on"),
    state: Path = _option(Path("fedmi-server"), help="the server's state: enrolled sites, runs, apps"),
    runs: Path = _option(Path("runs"), help="runs write their outputs only below this folder"),
    insecure: bool = _option(False, "--insecure", help="no TLS, no site authentication (loopback only)"),
    log_format: str = _option("text", help="text, or json: one JSON object a line (time, level, source, message)"),
) -> None:
    """Start the coordinating server (Flower SuperLink) with TLS and site authentication; Ctrl-C stops it."""
    _setup_logging(False, log_format)
    from fedmi.deploy.server import serve

    if insecure == (certs is not None):
        raise FedmiError("give --certs FOLDER for TLS, or --insecure (loopback only)")
    sys.exit(serve(None if insecure else certs, state, host, port, enroll, runs))


@app.command("enroll")
def enroll_site(
    key: Path = typer.Argument(..., help="the site's public key (sites/NAME.pub)"),
    name: Optional[str] = _option(None, help="the site's name (default: the key's comment)"),
    server: str = _option("127.0.0.1:9092", help=_CONNECTION_HELP),
    ca: Optional[Path] = _option(None, help="the CA certificate (ca.pem)"),
    state: Path = _option(Path("fedmi-server"), help=_STATE_HELP),
    replace: bool = _option(False, "--replace", help="the site is enrolled already: this is its new key (rotation)"),
) -> None:
    """Admit a site to a running server by its public key (on the server's machine)."""
    _setup_logging(False)
    from fedmi.deploy.enrolment import enroll

    enroll(_connection(server, ca, False, state), key, name, replace=replace)


@app.command()
def revoke(
    name: str = typer.Argument(..., help="the site's enrolled name"),
    server: str = _option("127.0.0.1:9092", help=_CONNECTION_HELP),
    ca: Optional[Path] = _option(None, help="the CA certificate (ca.pem)"),
    state: Path = _option(Path("fedmi-server"), help=_STATE_HELP),
) -> None:
    """Remove a site from the federation: its key is refused from now on (on the server's machine)."""
    _setup_logging(False)
    from fedmi.deploy.enrolment import revoke as revoke_site

    revoke_site(_connection(server, ca, False, state), name)


@app.command()
def site(
    data: Path = _option(..., help="the site's data config (YAML: dataset, site)"),
    key: Optional[Path] = _option(None, help="the site's private key (sites/NAME.key)"),
    server: str = _option("127.0.0.1:9092", help=_CONNECTION_HELP),
    ca: Optional[Path] = _option(None, help="the CA certificate (ca.pem)"),
    port: int = _option(9094, min=1, max=65535, help="local port of this site's app process (one per site)"),
    state: Path = _option(Path("fedmi-site"), help="the site's own records: a line per task, its state in each run"),
    operator_key: Optional[Path] = _option(None, help="the operator's public key (default: operator.pub beside --ca)"),
    poll: float = _option(DEFAULT_SITE_POLL, min=0.01, max=60, help="seconds between two looks for work at the server"),
    insecure: bool = _option(False, "--insecure", help="no TLS (loopback only)"),
    log_format: str = _option("text", help="text, or json: one JSON object a line (time, level, source, message)"),
) -> None:
    """Join a federation as one site (Flower SuperNode); the data stays here. Ctrl-C leaves."""
    _setup_logging(False, log_format)
    from fedmi.deploy.site import run_site

    sys.exit(run_site(_connection(server, ca, insecure), data, key, port, state, poll, operator_key))


@app.command()
def submit(
    config: Optional[Path] = typer.Argument(None, help="YAML file describing the run"),
    resume: Optional[Path] = _option(None, help="continue the run in this folder after its last round"),
    out: Optional[Path] = _option(None, help="run folder on this (the server's) machine (default: the config's "
                                             "`out`, else runs/NAME)"),
    overwrite: bool = _option(False, "--overwrite", help="replace the run already in the output folder, "
                                                         "once the new one finishes"),
    server: str = _option("127.0.0.1:9092", help=_CONNECTION_HELP),
    ca: Optional[Path] = _option(None, help="the CA certificate (ca.pem); operator.key beside it signs the run"),
    state: Path = _option(Path("fedmi-server"), help=_STATE_HELP),
    insecure: bool = _option(False, "--insecure", help="no TLS (loopback only)"),
) -> None:
    """Run a federation on the connected sites and stream its progress; checkpoints every round."""
    _setup_logging(False)
    from fedmi.deploy.runs import submit as submit_run
    from fedmi.experiments.config import load_config

    if (config is None) == (resume is None):
        raise FedmiError("give a config file to start a run, or --resume RUN_DIR to continue one")
    if resume is not None and (out is not None or overwrite):
        raise FedmiError("fedmi submit: --resume continues the run in its own folder; --out and --overwrite do not apply")
    import json

    configured = load_config(config).out if config is not None else None
    run_dir = resume or out or (Path(configured) if configured else Path("runs") / config.stem)
    submit_run(_connection(server, ca, insecure, state), config, run_dir, resume is not None, overwrite)
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = summary["config"]["rounds"]
    _print_final(f"{summary['config']['trainer']['name']} on the connected sites: after {counted(rounds, 'round')}",
                 summary.get("table_metrics", ["acc", "auc"]), summary.get("final") or {}, summary.get("task", ""))
    out_console.print(f"wrote {run_dir}/: " + ", ".join(sorted(p.name for p in run_dir.iterdir())))


@app.command()
def status(
    server: str = _option("127.0.0.1:9092", help=_CONNECTION_HELP),
    ca: Optional[Path] = _option(None, help="the CA certificate (ca.pem)"),
    insecure: bool = _option(False, "--insecure", help="no TLS (loopback only)"),
    state: Path = _option(Path("fedmi-server"), help=_STATE_HELP),
    as_json: bool = _option(False, "--json", help="everything Flower reports, as JSON"),
    min_sites: int = _option(1, min=0, help="exit with status 1 when fewer enrolled sites are online (monitoring)"),
) -> None:
    """The server's enrolled sites (online or not, each one's last reply to a run) and its runs.
    Exits 1 when fewer than --min-sites sites are online, 2 when the server does not answer."""
    _setup_logging(False)
    from fedmi.deploy.runs import status as server_status, unhealthy

    found = server_status(_connection(server, ca, insecure, state), state)
    problem = unhealthy(found, min_sites)
    if as_json:
        out_console.print_json(data={**found, "healthy": problem is None, "problem": problem})
        sys.exit(1 if problem else 0)
    sites = Table(title="Sites")
    for col in ("site", "node id", "status", "online since", "offline since", "last contact", "last run, round"):
        sites.add_column(col)
    for n in found["sites"]:
        last = f"{n['last-run']}, round {n['last-round']} ({n['last-task']})" if "last-run" in n else ""
        sites.add_row(n["site"], str(n.get("node-id")), n.get("status", "?"), n.get("online-at", ""),
                      n.get("offline-at", ""), n.get("last-contact", ""), last)
    runs = Table(title="Runs")
    for col in ("run id", "status", "started", "finished", "seconds"):
        runs.add_column(col)
    for r in found["runs"]:
        runs.add_row(str(r.get("run-id")), r.get("status", "?"), r.get("running-at", ""), r.get("finished-at", ""),
                     f"{r.get('elapsed', 0):.0f}")
    out_console.print(sites)
    out_console.print(runs)
    if problem:
        err_console.print(f"unhealthy: {problem}", highlight=False)
        sys.exit(1)


@app.command()
def robustness(
    dataset: str = _option("heart-disease", help="a dataset (fedmi datasets), csv:PATH or npz:PATH"),
    data_options: Optional[str] = _option(None, help="the dataset's options as YAML, e.g. '{num_sites: 10}'"),
    sites: Optional[int] = _option(None, help="divide the sites into this many (each keeps its hospital's data)"),
    aggregators: Optional[str] = _option(None, help="aggregation pipelines separated by ';' (default: weighted_mean; "
                                                    "median; trimmed_mean(beta=0.3); krum(f=3); multi_krum(f=3); "
                                                    "geometric_median; norm_bound(factor=1.0) | weighted_mean; dos)"),
    kinds: str = _option(",".join(("label_flip", "noisy_data", "sign_flip", "gaussian", "scaled", "nan")),
                         help="corruptions: label_flip, noisy_data, blurred_images (data); sign_flip, scaled, "
                              "gaussian, nan, inf (updates)"),
    fractions: str = _option("0,0.1,0.3", help="fractions of sites corrupted (0: the clean federation)"),
    strength: Optional[str] = _option(None, help="per kind, its size as YAML, e.g. '{label_flip: 1.0, scaled: 50}'"),
    repeats: int = _option(3, help="repeats (splits, initial weights, corrupted sites)"),
    rounds: int = _option(20, help="federated rounds"),
    model: Optional[str] = _option(None, help="a model (default: logistic for tables, cnn for images)"),
    model_options: Optional[str] = _option(None, help="the model's arguments as a YAML mapping"),
    trainer: Optional[str] = _option(None, help="the local method as YAML (default '{name: fedavg, lr: 0.05, "
                                                "local_steps: 10}'; images: adam, lr 0.001, one pass)"),
    runtime: str = _option("sequential", help="sequential, vectorised or processes"),
    seed: int = _option(0, help="seed of splits, initial weights, corrupted sites and noise"),
    out: Optional[Path] = _option(None, help="output folder (default runs/robustness-DATASET)"),
    overwrite: bool = _option(False, "--overwrite", help="replace the results already in the output folder"),
    verbose: bool = _option(False, "--verbose", "-v", help="log every round and every decision"),
) -> None:
    """AUC of each aggregator x corruption kind x corrupted fraction: a table and a heat map (survey §V-C)."""
    _setup_logging(verbose)
    from fedmi.experiments.config import DataConfig, validated
    from fedmi.experiments.federated_run import federation_for
    from fedmi.experiments.outputs import ROBUSTNESS, output_folder
    from fedmi.experiments.robustness import (DEFAULT_AGGREGATORS, RobustnessConfig, best_aggregators,
                                              run_robustness, table_columns, work_units, write_robustness_report)

    data = validated(DataConfig, {"dataset": dataset, **(_yaml_mapping(data_options, "--data-options") or {})},
                     "fedmi robustness", prefix="option ")
    fed = federation_for(data, seed)
    if sites is not None:
        fed = fed.subdivide(sites, seed)
    image = fed.kind == "image"
    default_trainer = {"name": "fedavg", "optimizer": "adam", "lr": 0.001, "local_epochs": 1} if image else \
        {"name": "fedavg", "lr": 0.05, "local_steps": 10}
    cfg = RobustnessConfig(
        aggregators=[a.strip() for a in aggregators.split(";") if a.strip()] if aggregators
        else list(DEFAULT_AGGREGATORS),
        kinds=[k.strip() for k in kinds.split(",") if k.strip()], fractions=_numbers(fractions, "--fractions"),
        strength={k: float(v) for k, v in (_yaml_mapping(strength, "--strength") or {}).items()},
        repeats=repeats, rounds=rounds, seed=seed, model=model or ("cnn" if image else "logistic"),
        model_options=_yaml_mapping(model_options, "--model-options") or {},
        trainer=_yaml_mapping(trainer, "--trainer") or default_trainer, runtime=runtime)
    target = out or Path("runs") / f"robustness-{fed.name.replace(':', '-')}"
    if fed.synthetic:
        err_console.print(f"[bold yellow]SYNTHETIC DATA:[/] {fed.description}")
    with output_folder(target, "overwrite" if overwrite else "new", settings=ROBUSTNESS, progress=ROBUSTNESS) as path:
        quiet = logging.getLogger("fedmi").level
        if not verbose:  # refused updates are expected here by the hundred; the table counts them
            logging.getLogger("fedmi").setLevel(logging.ERROR)
        try:
            with _progress() as progress:
                task = progress.add_task(fed.name, total=work_units(fed, cfg))
                result = run_robustness(fed, cfg, advance=lambda n: progress.update(task, advance=1, description=n))
        finally:
            logging.getLogger("fedmi").setLevel(quiet)
        write_robustness_report(result, path)
    table = Table(title=f"Corrupted sites: {fed.name} ({result.metric.upper()}, mean over sites)")
    table.add_column("Aggregation")
    columns = table_columns(result)
    for kind, frac in columns:
        table.add_column("clean" if kind == "clean" else f"{kind} {float(frac):.0%}", justify="right")
    from fedmi.core.metrics import format_summary

    for agg, by_kind in result.scores.items():
        table.add_row(agg, *(format_summary(by_kind[k][f]) if f in by_kind.get(k, {}) else "–" for k, f in columns))
    out_console.print(table)
    for kind, b in best_aggregators(result).items():
        out_console.print(f"{kind}: best {b['aggregator']} {b['score']:.3f} (drop {b['drop']:+.3f} against the clean "
                          "weighted mean)", highlight=False)
    out_console.print(f"wrote {target}/: " + ", ".join(sorted(p.name for p in target.iterdir())))


@app.command()
def privacy(
    config: Path = typer.Argument(..., help="YAML file of the federated run to make private (as for fedmi run)"),
    level: str = _option("sample", help="sample (DP-SGD at each site) or client (DP-FedAvg)"),
    noise_at: str = _option("server", help="client level: the noise once on the sum (server) or at each site (site)"),
    clip_norm: float = _option(..., help="C: the bound on each sample's gradient (sample) or site's update (client)"),
    epsilons: Optional[str] = _option(None, help="target ε of each private setting, e.g. 1,4,16"),
    noise_multipliers: Optional[str] = _option(None, help="noise multipliers of further settings, e.g. 0.5,1,2"),
    delta: float = _option(1e-5, help="the δ at which ε is calibrated and reported"),
    repeats: int = _option(5, help="repeats (each its own split and initial model)"),
    no_clipped: bool = _option(False, "--no-clipped", help="leave out the clipped run without noise"),
    out: Optional[Path] = _option(None, help="output folder (default runs/privacy-CONFIG)"),
    overwrite: bool = _option(False, "--overwrite", help="replace the results already in the output folder"),
    verbose: bool = _option(False, "--verbose", "-v", help="log every round and every decision"),
) -> None:
    """What each privacy budget costs: the reference, clipping alone and each ε, mean ± std over repeats."""
    _setup_logging(verbose)
    from fedmi.experiments.config import load_config, validated
    from fedmi.experiments.outputs import output_folder
    from fedmi.experiments.privacy_utility import (PRIVACY, PrivacyUtilityConfig, run_privacy_utility, work_units,
                                                   write_privacy_report)

    base = load_config(config)
    if base.privacy is not None:
        raise FedmiError(f"{config}: the run already names its privacy; fedmi privacy sets it for each setting "
                         "(remove the privacy field)")
    raw = {"level": level, "noise_at": noise_at, "clip_norm": clip_norm, "delta": delta, "repeats": repeats, "clipped": not no_clipped,
           "epsilons": _numbers(epsilons, "--epsilons") if epsilons else [],
           "noise_multipliers": _numbers(noise_multipliers, "--noise-multipliers") if noise_multipliers else []}
    cfg = validated(PrivacyUtilityConfig, raw, "fedmi privacy", prefix="option ")
    for _, setting in cfg.settings()[1:]:  # a setting the run cannot take (client level with fraction < 1)
        validated(type(base), {**base.model_dump(mode="json"), "privacy": setting.model_dump(mode="json")},
                  f"fedmi privacy {config}")
    target = out or Path("runs") / f"privacy-{config.stem}"
    with output_folder(target, "overwrite" if overwrite else "new", settings=PRIVACY, progress=PRIVACY) as path:
        with _progress() as progress:
            task = progress.add_task(config.stem, total=work_units(cfg))
            result = run_privacy_utility(base, cfg, advance=lambda n: progress.update(task, advance=1, description=n))
        write_privacy_report(result, path)
    table = Table(title=f"Privacy and utility: {result.dataset} ({result.metric.upper()}, mean ± std over "
                        f"{cfg.repeats} repeats)")
    for col in ("Setting", "ε", "Mean over sites"):
        table.add_column(col, justify="left" if col == "Setting" else "right")
    from fedmi.core.metrics import format_summary
    from fedmi.experiments.privacy_utility import epsilon_cell

    for label, s in result.summary().items():
        table.add_row(label, "–" if label == "no privacy" else epsilon_cell(s), format_summary(s["mean"]))
    out_console.print(table)
    out_console.print(f"wrote {target}/: " + ", ".join(sorted(p.name for p in target.iterdir())))


@app.command()
def audit(
    dataset: str = _option("breastmnist", help="an image dataset (fedmi datasets): breastmnist, pneumoniamnist"),
    model: str = _option("cnn", help="the network attacked (fedmi's own: cnn; resnet18 with model options)"),
    model_options: Optional[str] = _option(None, help="the model's arguments as a YAML mapping"),
    targets: int = _option(4, help="attacked batches per defence (different real images each)"),
    attacks: str = _option("idlg,inverting_gradients", help="dlg, idlg, inverting_gradients"),
    iterations: int = _option(1000, help="inverting gradients' steps (DLG, iDLG: a fifth as many L-BFGS steps)"),
    batch_sizes: str = _option("4", help="defence rows: images behind one update"),
    local_steps: str = _option("5", help="defence rows: local steps in the attacked round"),
    clip_norm: float = _option(1.0, help="C of the DP defences (each image's gradient; the site's update)"),
    dp_sgd_noise: str = _option("0.001,0.01,0.1,1", help="defence rows: DP-SGD noise multipliers"),
    site_noise: str = _option("0.001,0.01,0.1,1", help="defence rows: noise multipliers added at the site"),
    partial_sharing: str = _option("head", help="defence rows: entries the site keeps (comma-separated module names "
                                   "or patterns; rows separated by ';'; empty: none)"),
    rounds: int = _option(20, help="rounds of the federated trainings attacked by membership inference (0: none)"),
    epsilons: str = _option("1,8", help="DP-SGD targets of the trained models attacked by membership inference"),
    client_epsilons: str = _option("", help="client-level DP-FedAvg targets of trained models attacked likewise"),
    seed: int = _option(0, help="seed of the images attacked, the model and the noise"),
    out: Optional[Path] = _option(None, help="output folder (default runs/audit-DATASET)"),
    overwrite: bool = _option(False, "--overwrite", help="replace the results already in the output folder"),
    verbose: bool = _option(False, "--verbose", "-v", help="log every round and every decision"),
) -> None:
    """Leakage measured by attack: gradient inversion of one site's update and membership inference on the
    final model, undefended and under each defence (PSNR, SSIM, attack AUC, TPR at low FPR, utility)."""
    _setup_logging(verbose)
    from fedmi.experiments.audit import AuditConfig, run_audit, work_units, write_audit_report
    from fedmi.experiments.config import validated
    from fedmi.experiments.outputs import AUDIT, output_folder

    whole = lambda text, flag: [int(v) for v in _numbers(text, flag)] if text else []  # noqa: E731
    raw = {"dataset": dataset, "model": model, "model_options": _yaml_mapping(model_options, "--model-options") or {},
           "targets": targets, "attacks": [a.strip() for a in attacks.split(",") if a.strip()],
           "iterations": iterations, "batch_sizes": whole(batch_sizes, "--batch-sizes"),
           "local_steps": whole(local_steps, "--local-steps"), "clip_norm": clip_norm,
           "dp_sgd_noise": _numbers(dp_sgd_noise, "--dp-sgd-noise") if dp_sgd_noise else [],
           "site_noise": _numbers(site_noise, "--site-noise") if site_noise else [], "rounds": rounds,
           "epsilons": _numbers(epsilons, "--epsilons") if epsilons else [],
           "client_epsilons": _numbers(client_epsilons, "--client-epsilons") if client_epsilons else [],
           "partial_sharing": [[p.strip() for p in row.split(",") if p.strip()] for row in partial_sharing.split(";")
                               if row.strip()], "seed": seed}
    cfg = validated(AuditConfig, raw, "fedmi audit", prefix="option ")
    target = out or Path("runs") / f"audit-{dataset}"
    with output_folder(target, "overwrite" if overwrite else "new", settings=AUDIT, progress=AUDIT) as path:
        with _progress() as progress:
            task = progress.add_task(dataset, total=work_units(cfg))
            result = run_audit(cfg, advance=lambda n: progress.update(task, advance=1, description=n))
        write_audit_report(result, path)
    out_console.print((path / "table.md").read_text(), highlight=False, soft_wrap=True)
    out_console.print(f"wrote {target}/: " + ", ".join(sorted(p.name for p in target.iterdir())))


@app.command()
def methods() -> None:
    """List the federated settings `fedmi table2 --methods` takes, the local methods and the aggregation steps."""
    from fedmi.client import METHODS
    from fedmi.experiments.table2 import FEDERATED_SETTINGS
    from fedmi.server import STEPS

    table = Table(title="Federated settings (fedmi table2 --methods)")
    for col in ("Setting", "Row", "Local method", "Aggregation", "Sites a round"):
        table.add_column(col)
    for name, setting in FEDERATED_SETTINGS.items():
        table.add_row(name, setting.label, setting.trainer,
                      (setting.pipeline or "weighted_mean | server_sgd").replace("({options})", ""),
                      "one, in cycles" if setting.cyclic else "all")
    out_console.print(table)
    out_console.print("local methods (trainer: name in a config): " + ", ".join(METHODS), highlight=False)
    out_console.print("aggregation steps (aggregator: 'a | b' in a config): " + ", ".join(STEPS), highlight=False)


@app.command()
def datasets() -> None:
    """List the embedded datasets: sites, sizes, class balance."""
    from fedmi.data.registry import describe_datasets

    described = describe_datasets()
    table = Table(title="Embedded datasets")
    for col in ("Dataset", "Site", "n", "class 0", "class 1"):
        table.add_column(col, justify="left" if col in ("Dataset", "Site") else "right")
    for d in described:
        name = d["name"] + (" (synthetic)" if d["synthetic"] else "")
        for i, s in enumerate(d["sites"]):
            counts = s["class_counts"]
            if d["task"] == "segmentation":  # pixels, not images: their shares
                total = sum(counts.values())
                cells = [f"{counts.get(k, 0) / total:.1%} px" for k in (0, 1)]
            else:
                cells = [str(counts.get(k, 0)) for k in (0, 1)]
            table.add_row(name if i == 0 else "", s["name"], str(s["n"]), *cells)
        table.add_section()
    out_console.print(table)
    for d in described:
        labels = ", ".join(f"{i} = {name}" for i, name in enumerate(d["label_names"]))
        out_console.print(f"[bold]{d['name']}[/]: {d['description']}; {d['task']} task, labels {labels}; "
                          f"input {tuple(d['input_shape'])}")
    from fedmi.data import DATASETS

    for name in DATASETS:  # the other names the command line takes (a variant of embedded data)
        entry = DATASETS.get(name)
        if not entry.embedded and not entry.path_prefix:
            out_console.print(f"[bold]{name}[/]: {(entry.__doc__ or '').strip().splitlines()[0]}")
    for name in DATASETS:
        fields = DATASETS.get(name).Options.model_fields
        shown = f"{name}:PATH" if DATASETS.get(name).path_prefix else name
        options = ", ".join(f"{k} ({f.default})" for k, f in fields.items() if k != "path") or "none"
        out_console.print(f"options of {shown}: {options}", highlight=False)


@app.command("inspect")
def inspect_data(
    config: Optional[Path] = typer.Argument(None, help="a run config (its data section is read) or a data config"),
    dataset: Optional[str] = _option(None, help="an embedded dataset (fedmi datasets) instead of a config"),
    out: Optional[Path] = _option(None, help="folder for data_card.json and the pictures (default runs/inspect-NAME)"),
    seed: int = _option(0, help="the seed of simulated partitions and scanners (0 to 2^63-1)"),
    **dataset_options,
) -> None:
    """Show each site's data before training: counts, labels or mask shares, shape, intensities; plot
    per-site intensity histograms and a sample grid (the sites' domain shift, seen first).

    The dataset options below apply with --dataset."""
    from fedmi.experiments.config import DataConfig
    from fedmi.experiments.data_card import data_card, write_data_card
    from fedmi.experiments.federated_run import federation_for

    if (config is None) == (dataset is None):
        raise FedmiError("fedmi inspect: give a config file or --dataset NAME")
    if config is not None:
        data, run_config = _data_from_config(config)
        seed = run_config.seed if run_config is not None else seed
    else:
        data = DataConfig(dataset=dataset, **{k: v for k, v in dataset_options.items() if v is not None})
    fed = federation_for(data, seed)
    card = data_card(fed)
    target = out or Path("runs") / f"inspect-{fed.name.replace(':', '-')}"
    written = write_data_card(fed, target)
    table = Table(title=f"{fed.name}: {fed.description}" + (" (SYNTHETIC DATA)" if fed.synthetic else ""))
    split = "pixels" if fed.task.name == "segmentation" else "labels"
    for col in ("Site", "n", "patients", split, "intensity mean±std [min, max]"):
        table.add_column(col, justify="left" if col in ("Site", split) else "right")
    for site in card["sites"]:
        if split == "pixels":
            shares = ", ".join(f"{k} {v:.1%}" for k, v in site["pixels"].items())
            detail = f"{shares}; {site['images_without_foreground']} images without foreground"
        else:
            detail = ", ".join(f"{k} {v}" for k, v in site.get("labels", {}).items())
        i = site["intensity"]
        table.add_row(site["name"], str(site["n"]), str(site.get("patients", "")), detail,
                      f"{i['mean']:.3f}±{i['std']:.3f} [{i['min']:.3g}, {i['max']:.3g}]")
    out_console.print(table)
    out_console.print(f"sample shape {tuple(fed.input_shape)}; {fed.task.name} task"
                      + (f"; common test set of {card['common_test']['n']}" if "common_test" in card else "")
                      + (f"; {counted(len(fed.skipped), 'file')} skipped (listed in data_card.json)" if fed.skipped else ""),
                      highlight=False)
    out_console.print(f"wrote {target}/: " + ", ".join(p.name for p in written), highlight=False)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a folder `fedmi run` or `fedmi table2` wrote"),
) -> None:
    """Write RUN_DIR/report.html: one self-contained page with the results, plots, example predictions,
    the data card and the config."""
    from fedmi.experiments.html_report import write_html_report

    out_console.print(f"wrote {write_html_report(run_dir)}", highlight=False)


@app.command()
def export(
    dataset: str = typer.Argument(..., help="a tabular dataset: heart-disease or synthetic-adni"),
    path: Path = typer.Argument(..., help="CSV file to write"),
    seed: int = _option(0, help="synthetic-adni: the generator's seed (0 to 2^63-1)"),
    overwrite: bool = _option(False, "--overwrite", help="replace PATH if it exists"),
    **dataset_options,
) -> None:
    """Write a tabular dataset as CSV (site, label, features): the format `--dataset csv:PATH` reads.

    The dataset options below apply to the datasets named after each (heart-disease --label severity: three
    classes by name)."""
    from fedmi.data.registry import load_federation
    from fedmi.experiments.outputs import write_file

    fed = load_federation(dataset, seed=seed, **{k: v for k, v in dataset_options.items() if v is not None})
    frame = fed.to_frame()
    # 9 digits: float32 reads back exactly
    write_file(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.9g"), overwrite)
    note = " (SYNTHETIC DATA)" if fed.synthetic else ""
    positive = f" --positive-label '{fed.label_names[-1]}'" if fed.task.name == "binary" else ""
    out_console.print(f"wrote {path}: {len(frame)} rows, {len(fed.sites)} sites, {frame.shape[1] - 2} features{note}; "
                      f"read it back with: fedmi table2 --dataset csv:{path}{positive}",
                      highlight=False, soft_wrap=True)


def main() -> None:
    # The datasets' options: only the commands that take them pay their imports.
    takes_options = {"table2": table2, "inspect": inspect_data, "export": export}
    if len(sys.argv) > 1 and sys.argv[1] in takes_options:
        _with_dataset_options(takes_options[sys.argv[1]])
    from fedmi.experiments.outputs import RunInterrupted

    _setup_logging(False)  # every command: warnings and errors as fedmi lines (a command may ask for more)
    try:
        app()  # usage errors (unknown option, bad value) are typer's: it prints them and exits 2
    except RunInterrupted as e:
        _fail(str(e), 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except FedmiError as e:
        _fail(str(e))
    except OSError as e:  # an output path that is a folder, a read-only disk, ...
        _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))


def _fail(message: str, status: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
