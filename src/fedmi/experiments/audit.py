"""`fedmi audit`: what fedmi's own updates and models leak, measured by attack, with and without
each defence (survey §VI-A(3)).

Two attackers:

1. **The server, inverting one site's update** (`fedmi.privacy.inversion`). The attacked site holds
   a batch of real images (BreastMNIST, PneumoniaMNIST) and runs one round of its local method on
   them from the global model (fedmi's model, at its initial weights); the server inverts the
   update it receives. Each defence changes one thing from the undefended round (one image, one
   full-batch SGD step):
   - batch size: more images behind one update;
   - local steps: a whole round of several steps, which is what fedmi sends;
   - DP-SGD (`dp_sgd`): each image's gradient clipped to C, noise σ·C per step; ε of that round;
   - client-level noise at the site: the update clipped to C and N(0, (z·C)²) added before it is
     sent (the local variant of DP-FedAvg; against the server only noise at the site protects);
     ε of that release is the Gaussian mechanism's at noise z·C and sensitivity 2C;
   - partial sharing (`partial_sharing`, Yang et al.): the named entries (the classifier head) stay at
     the site and the update omits them. In the attacked first round the site's head is still the
     server's copy, so the attacker knows every weight and lacks only the head's part of the update;
     it is given the labels (iDLG reads them off the head's bias, which is withheld).
   Each reconstruction is scored by PSNR and SSIM against its original; a PNG grid shows originals
   above their reconstructions.
2. **Anyone holding the final model, inferring membership** (`fedmi.privacy.membership`). The
   federation trains with each training-level defence (none, DP-SGD at each target ε, client-level
   DP-FedAvg at each target ε); the
   loss-threshold attack scores every site's training records (members) against its test records
   (non-members). The table gives the attack's AUC and TPR at 1 % and 0.1 % FPR beside the model's
   test AUC (what the defence costs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal

import numpy as np
import torch
from pydantic import Field

from fedmi.client import make_method
from fedmi.core.metrics import format_summary, summarize
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.schema import Settings
from fedmi.core.site_loop import model_outputs, train_site
from fedmi.core.types import RoundInfo, SiteData
from fedmi.errors import FedmiError
from fedmi.experiments.config import PrivacyConfig, RunConfig
from fedmi.experiments.outputs import AUDIT, write_protocol_files
from fedmi.models import build_model
from fedmi.privacy import PrivacyAccountant, clip_to_norm, gaussian_noise_like
from fedmi.privacy.inversion import InversionSettings, SiteView, invert, parameters_of, reconstruction_scores
from fedmi.privacy.membership import loss_threshold_attack


class AuditConfig(Settings):
    """What `fedmi audit` attacks and with what effort.

    Example::

        AuditConfig(dataset="breastmnist", targets=4, attacks=["inverting_gradients"], iterations=500)
    """

    dataset: str = "breastmnist"
    model: str = "cnn"
    model_options: dict = Field(default_factory=dict)
    seed: int = Field(0, ge=0)
    # gradient inversion
    targets: int = Field(4, ge=1, le=64)  # attacked batches per defence (different images each)
    attacks: list[Literal["dlg", "idlg", "inverting_gradients"]] = Field(
        default_factory=lambda: ["idlg", "inverting_gradients"])
    iterations: int = Field(1000, ge=1)  # inverting gradients' Adam steps (DLG/iDLG: a fifth as many L-BFGS iterations)
    tv: float = Field(1e-4, ge=0)
    lr: float = Field(0.1, gt=0)  # the attacked site's local learning rate
    batch_sizes: list[int] = Field(default_factory=lambda: [4])  # defences: images behind one update
    local_steps: list[int] = Field(default_factory=lambda: [5])  # defences: steps in the attacked round
    clip_norm: float = Field(1.0, gt=0)  # C of both DP defences
    dp_sgd_noise: list[float] = Field(default_factory=lambda: [0.1, 1.0])  # σ of DP-SGD's rows
    site_noise: list[float] = Field(default_factory=lambda: [0.1, 1.0])  # z of the noise-at-the-site rows
    # partial-sharing rows: each the entries (module names or patterns) the site keeps
    partial_sharing: list[list[Annotated[str, Field(min_length=1)]]] = Field(default_factory=lambda: [["head"]])
    delta: float = Field(1e-5, gt=0, lt=1)
    # membership inference
    rounds: int = Field(20, ge=0)  # of each federated training; 0: no membership inference
    epsilons: list[float] = Field(default_factory=lambda: [8.0])  # DP-SGD targets of the trained models
    client_epsilons: list[float] = Field(default_factory=list)  # client-level DP-FedAvg targets of trained models
    trainer: dict = Field(default_factory=lambda: {"name": "fedavg", "optimizer": "sgd", "lr": 0.1,
                                                   "momentum": 0.9, "batch_size": 32, "local_epochs": 2})


@dataclass(frozen=True)
class Defence:
    """One row of the inversion table: the attacked round's images, steps and privacy mechanism."""

    label: str
    batch: int = 1
    steps: int = 1
    dp_sgd_noise: float | None = None
    site_noise: float | None = None
    private: tuple[str, ...] = ()  # partial sharing: the entries the site keeps

    def epsilon(self, clip: float, delta: float) -> float | None:
        """ε of the one round the server sees (None: no mechanism; inf: no noise)."""
        if self.dp_sgd_noise is not None:
            accountant = PrivacyAccountant(delta)
            accountant.spend(self.dp_sgd_noise, 1.0, self.steps)  # full batches: every image in every step
            return accountant.epsilon()
        if self.site_noise is not None:  # sensitivity 2C (any two datasets of the site), noise z·C
            accountant = PrivacyAccountant(delta)
            accountant.spend(self.site_noise / 2, 1.0, 1)
            return accountant.epsilon()
        return None


def defences(cfg: AuditConfig) -> list[Defence]:
    out = [Defence("none (1 image, 1 step)")]
    out += [Defence(f"batch of {b} images", batch=b) for b in cfg.batch_sizes if b != 1]
    out += [Defence(f"{t} local steps", steps=t) for t in cfg.local_steps if t != 1]
    out += [Defence(f"DP-SGD σ={z:g}, C={cfg.clip_norm:g}", dp_sgd_noise=z) for z in cfg.dp_sgd_noise]
    out += [Defence(f"noise at the site z={z:g}, C={cfg.clip_norm:g}", site_noise=z) for z in cfg.site_noise]
    out += [Defence(f"partial sharing, {' + '.join(p)} kept", private=tuple(p)) for p in cfg.partial_sharing if p]
    return out


def _attacks(cfg: AuditConfig, defence: Defence) -> list[str]:
    """The attacks run against a defence's row: iDLG reads one image's label off the head's bias."""
    return [a for a in cfg.attacks if a != "idlg" or (defence.batch == 1 and not defence.private)]


@dataclass
class AuditResult:
    dataset: str
    config: dict
    # defence label -> attack -> {"psnr": [...], "ssim": [...], "epsilon": float | None}
    inversion: dict[str, dict[str, dict]] = field(default_factory=dict)
    membership: dict[str, dict] = field(default_factory=dict)  # training setting -> attack figures and utility
    images: dict[str, dict[str, list]] = field(default_factory=dict)  # for the grid: originals and reconstructions

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "config": self.config, "inversion": self.inversion,
                "membership": self.membership}


def attacked_update(defence: Defence, cfg: AuditConfig, model, task, x: torch.Tensor, y: torch.Tensor,
                    params, seed: int):
    """The update the site sends for one round on the images (x, y) under `defence`."""
    inner = make_method("fedavg", lr=cfg.lr, batch_size=None, local_steps=defence.steps)
    method = inner
    if defence.private:
        method = make_method("partial_sharing", inner=inner.spec(), private=list(defence.private))
    if defence.dp_sgd_noise is not None:
        method = make_method("dp_sgd", inner=inner.spec(), clip_norm=cfg.clip_norm,
                             noise_multiplier=defence.dp_sgd_noise, delta=cfg.delta)
    site = SiteData("attacked", x, y, x[:0], y[:0])
    update, _ = train_site(method, model, task, site, params, None, RoundInfo(0, 1, seed, 1), 0)
    delta = update.delta
    if defence.site_noise is not None:
        delta, _ = clip_to_norm(delta, cfg.clip_norm)
        noise = gaussian_noise_like(delta, defence.site_noise * cfg.clip_norm,
                                    torch_generator(Stream.PRIVACY_NOISE, seed, 1))
        delta = type(delta)((k, v + noise[k]) for k, v in delta.items())
    return delta


def run_inversion(cfg: AuditConfig, fed, result: AuditResult, advance: Callable[[str], None] | None) -> None:
    """Attack `cfg.targets` batches under every defence; scores and images into `result`."""
    pool = fed.split(cfg.seed, 0.2)
    images = torch.cat([s.x_train for s in pool])
    labels = torch.cat([s.y_train for s in pool])
    order = torch.randperm(len(images), generator=torch_generator(Stream.SIMULATION, cfg.seed, 31))
    model = build_model(cfg.model, fed.input_shape, cfg.seed, fed.task.num_outputs, cfg.model_options)
    params = parameters_of(model)
    for defence in defences(cfg):
        rows = result.inversion.setdefault(defence.label, {})
        for attack in _attacks(cfg, defence):
            scores = {"psnr": [], "ssim": [], "epsilon": defence.epsilon(cfg.clip_norm, cfg.delta)}
            for t in range(cfg.targets):
                pick = order[t * defence.batch:(t + 1) * defence.batch]
                x, y = images[pick], labels[pick]
                delta = attacked_update(defence, cfg, model, fed.task, x, y, params, cfg.seed + t)
                view = SiteView(model, fed.task.per_sample_loss, params, delta, cfg.lr, defence.steps, defence.batch,
                                tuple(fed.input_shape))
                iterations = cfg.iterations if attack == "inverting_gradients" else max(1, cfg.iterations // 5)
                settings = InversionSettings(attack, iterations, cfg.lr if attack == "inverting_gradients" else 1.0,
                                             cfg.tv, seed=cfg.seed + t)
                rec, _ = invert(view, settings, labels=None if defence.batch == 1 and not defence.private else y)
                s = reconstruction_scores(x, rec)
                scores["psnr"] += s["psnr"]
                scores["ssim"] += s["ssim"]
                if t == 0:
                    grid = result.images.setdefault("originals", [])
                    if len(grid) < 1:
                        grid.append(x[0, 0].numpy().tolist())
                    result.images.setdefault(f"{defence.label} / {attack}", []).append(
                        rec[s["order"][0], 0].numpy().tolist())
                if advance is not None:
                    advance(f"{defence.label}: {attack}, target {t + 1}")
            rows[attack] = scores


def _losses(model, task, params, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    model.load_state_dict(params)
    return task.per_sample_loss(model_outputs(model, x), y).tolist()


def run_membership(cfg: AuditConfig, result: AuditResult, advance: Callable[[str], None] | None) -> None:
    """Train the federation with each training-level defence; attack each final model."""
    from fedmi.experiments.federated_run import run_federated

    base = RunConfig.model_validate({"data": {"dataset": cfg.dataset}, "model": cfg.model,
                                     "model_options": cfg.model_options, "trainer": cfg.trainer,
                                     "rounds": cfg.rounds, "seed": cfg.seed, "evaluate_every": 0,
                                     "runtime": "vectorised"})
    settings: list[tuple[str, PrivacyConfig | None]] = [("no defence", None)]
    settings += [(f"DP-SGD ε={e:g}", PrivacyConfig(level="sample", clip_norm=cfg.clip_norm, target_epsilon=e,
                                                   delta=cfg.delta)) for e in cfg.epsilons]
    settings += [(f"DP-FedAvg ε={e:g}", PrivacyConfig(level="client", clip_norm=cfg.clip_norm, target_epsilon=e,
                                                      delta=cfg.delta)) for e in cfg.client_epsilons]
    for label, privacy in settings:
        try:
            run = run_federated(base.model_copy(update={"privacy": privacy}))
        except FedmiError as e:  # the defence's noise wrecked training (client level over a few sites): a result
            result.membership[label] = {"failed": str(e)}
            if advance is not None:
                advance(f"membership: {label}")
            continue
        record = run.result.history[-1]
        model = build_model(run.config.model, run.federation.input_shape, cfg.seed, run.federation.task.num_outputs,
                            run.config.model_options)
        sites = run.federation.split(cfg.seed, run.config.data.test_fraction)
        task = run.federation.task
        members = sum((_losses(model, task, run.result.params, s.x_train, s.y_train) for s in sites), [])
        others = sum((_losses(model, task, run.result.params, s.x_test, s.y_test) for s in sites), [])
        aucs = [m["auc"] for m in record["test"].values() if m.get("auc") is not None]
        result.membership[label] = {**loss_threshold_attack(members, others),
                                    "test_auc": float(np.mean(aucs)) if aucs else None,
                                    "epsilon": record.get("local_epsilon", record.get("epsilon")),
                                    "noise_multiplier": record.get("noise_multiplier")}
        if advance is not None:
            advance(f"membership: {label}")


def run_audit(cfg: AuditConfig, advance: Callable[[str], None] | None = None) -> AuditResult:
    from fedmi.data.registry import load_federation

    fed = load_federation(cfg.dataset, cfg.seed)
    if fed.kind != "image" or len(fed.input_shape) != 3 or fed.task.name != "binary":
        raise FedmiError(f"fedmi audit attacks 2-D images with a binary label; dataset {fed.name} has "
                         f"{fed.task.name} labels of samples shaped {tuple(fed.input_shape)}")
    result = AuditResult(fed.name, cfg.model_dump(mode="json"))
    run_inversion(cfg, fed, result, advance)
    if cfg.rounds:
        run_membership(cfg, result, advance)
    return result


def work_units(cfg: AuditConfig) -> int:
    inversions = sum(cfg.targets * len(_attacks(cfg, d)) for d in defences(cfg))
    return inversions + (1 + len(cfg.epsilons) + len(cfg.client_epsilons) if cfg.rounds else 0)


def _eps(value: float | None) -> str:
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else f"{value:.3g}"


def markdown_table(result: AuditResult) -> str:
    cfg = result.config
    lines = [f"# Leakage audit: {result.dataset}", "",
             f"## The server inverts one site's update ({cfg['model']}, at its initial weights)", "",
             f"PSNR (dB) and SSIM of each reconstruction against its original, mean ± std over {cfg['targets']} "
             f"attacked batches of real images (each image of a batch scored). The site's round: full-batch SGD, "
             f"lr {cfg['lr']:g}. ε at δ = {cfg['delta']:g} of that one round.", "",
             "| defence | ε | attack | PSNR | SSIM |", "|---|---:|---|---:|---:|"]
    for label, by_attack in result.inversion.items():
        for attack, s in by_attack.items():
            lines.append(f"| {label} | {_eps(s['epsilon'])} | {attack} | {format_summary(summarize(s['psnr']), 1)} | "
                         f"{format_summary(summarize(s['ssim']), 3)} |")
    if result.membership:
        lines += ["", f"## Membership inference on the final model ({cfg['rounds']} rounds of "
                  f"{cfg['trainer'].get('name', 'fedavg')})", "",
                  "The loss-threshold attack (Yeom et al. 2018): members are the sites' training records, "
                  "non-members their test records. TPR at a false-positive rate finer than one non-member is "
                  "n/a. Test AUC: the model's, mean over sites (what the defence costs).", "",
                  "| training | ε | attack AUC | TPR at 1% FPR | TPR at 0.1% FPR | members / non-members | test AUC |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        failed = {label: m["failed"] for label, m in result.membership.items() if "failed" in m}
        for label, m in result.membership.items():
            cell = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            if "failed" in m:
                lines.append(f"| {label} | – | – | – | – | – | training failed (below) |")
                continue
            lines.append(f"| {label} | {_eps(m['epsilon'])} | {m['auc']:.3f} | {cell(m['tpr_at_1%'])} | "
                         f"{cell(m['tpr_at_0.1%'])} | {m['members']} / {m['nonmembers']} | {cell(m['test_auc'])} |")
        lines += [f"", *(f"{label}: {reason}" for label, reason in failed.items())] if failed else []
    return "\n".join(lines) + "\n"


def plot_grid(result: AuditResult, path: Path) -> None:
    """The first attacked image above its reconstruction under each defence and attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(result.images.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels), 2.2), squeeze=False)
    for ax, (label, image) in zip(axes[0], panels):
        ax.imshow(np.asarray(image[0]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(label.replace(" / ", "\n"), fontsize=6)
        ax.axis("off")
    fig.suptitle(f"Gradient inversion on {result.dataset}: the original, then each defence's reconstruction",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_audit_report(result: AuditResult, out: Path) -> list[Path]:
    return write_protocol_files(out, AUDIT, result.to_json(), markdown_table(result), "reconstructions.png",
                                lambda path: plot_grid(result, path))
