"""FedSLD (Luo and Wu, "FedSLD: Federated Learning with Shared Label Distribution for Medical Image
Classification", ISBI 2022; survey ref. [79]): label skew corrected in each site's batch loss.

The federation's label distribution pi (each class's share of all training examples) is known to
every site: the sites declare their label counts, and the server sends pi with the parameters
(`RoundInfo.extras`). A site's batch loss weighs each class present in the batch by pi rather than
by its share of the batch:

    L_batch = sum_{c in batch} pi_c * mean_{i: y_i = c} l_i  /  sum_{c in batch} pi_c

i.e. each sample's cross-entropy is weighted by pi_{y_i} / (its class's share of the batch),
normalised. A batch whose classes appear in the federation's proportions gets the plain mean
loss, so with matching distributions FedSLD is FedAvg exactly (a test checks it). Training is
otherwise FedAvg's (any of its optimisers and options).
"""

from __future__ import annotations

import torch

from fedmi.client.sgd import FedAvg
from fedmi.core.extras import LABEL_DISTRIBUTION
from fedmi.core.local import Batch, SiteContext, State, register_method
from fedmi.core.tasks import BinaryTask, MulticlassTask
from fedmi.errors import FedmiError


@register_method
class FedSLD(FedAvg):
    """FedAvg whose batch loss weighs classes by the federation's shared label distribution.

    Args: those of `FedAvg`. Binary and multi-class tasks only.
    Example: ``make_method("fedsld", optimizer="adam", lr=1e-3, local_epochs=1)``.
    """

    name = "fedsld"
    needs_label_distribution = True

    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        if not isinstance(ctx.task, (BinaryTask, MulticlassTask)):
            raise FedmiError(f"fedsld weighs classes: it needs a binary or multi-class task, not {ctx.task.name}")
        if LABEL_DISTRIBUTION not in ctx.round.extras:
            raise FedmiError("fedsld: the server sent no label distribution (run it through fedmi's runner, "
                             "which builds it from the sites' label counts)")
        return super().init(global_params, site_state, ctx)

    def objective(self, state: State, batch: Batch, ctx: SiteContext) -> tuple[torch.Tensor, torch.Tensor]:
        pi = ctx.round.extras[LABEL_DISTRIBUTION]
        outputs = ctx.forward(state["params"], state["buffers"], batch.x)
        per_sample = ctx.task.per_sample_loss(outputs, batch.y)
        weight = batch.weight if batch.weight is not None else torch.full_like(per_sample, 1.0 / per_sample.shape[0])
        # vmap-safe one-hot: (samples, classes)
        onehot = (batch.y.long().unsqueeze(-1) == torch.arange(pi.shape[0], device=pi.device)).to(per_sample.dtype)
        share = weight @ onehot  # each class's share of the batch (0 if absent)
        class_loss = (per_sample * weight) @ onehot  # share_c * mean loss of class c
        pi_present = pi.to(per_sample.dtype) * (share > 0)
        loss = (pi_present * class_loss / share.clamp_min(1e-12)).sum() / pi_present.sum().clamp_min(1e-12)
        data = (per_sample * weight).sum()
        extra = self.regulariser(state, ctx)
        return (loss if extra is None else loss + extra), data
