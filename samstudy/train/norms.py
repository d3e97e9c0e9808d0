"""Per-epoch norms for Proposition 4.1 of the lab notes (J-SAM shrinks the intermediate
activations and the last layer's weights): the L2 norm of each layer group's weights, and the
mean L2 norm of the classifier's input (the feature vector) on a fixed batch of training data.

Everything stays on the device: :meth:`NormProbe.measure` returns one float64 vector that the
loop reads together with the epoch's training sums, so the norms cost no host synchronisation
of their own.
"""

from __future__ import annotations

import torch
from torch import nn

from samstudy.models import classifier_path, layer_groups, submodule

WEIGHT_NORM = "weight_norm"  # the whole model; per group: weight_norm.<group>
LAST_LAYER_NORM = "last_layer_norm"  # the classifier's parameters
ACTIVATION_NORM = "activation_norm"  # mean over the fixed batch of ||features(x)||_2
NORM_BATCH_SIZE = (
    128  # a fixed batch: a smooth curve needs no more, and it costs ~1% of an MLP epoch
)


class NormProbe:
    """Measures the norms of one model; ``names`` label the entries of :meth:`measure`."""

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        batch: torch.Tensor | None,
        *,
        channels_last: bool = False,
    ) -> None:
        self.model = model
        groups = layer_groups(model)
        self.params = [p for members in groups.values() for p in members]
        device = self.params[0].device
        # group index of each parameter tensor: squares are summed per group by index_add_
        self.index = torch.tensor(
            [g for g, members in enumerate(groups.values()) for _ in members], device=device
        )
        self.num_groups = len(groups)
        self.names = [f"{WEIGHT_NORM}.{name}" for name in groups] + [WEIGHT_NORM]
        path = classifier_path(model_name)
        self.classifier = submodule(model, path) if path is not None else None
        self.head_params = list(self.classifier.parameters()) if self.classifier else []
        if self.head_params:
            self.names.append(LAST_LAYER_NORM)
        self.batch = batch if self.classifier is not None else None
        if self.batch is not None:
            if channels_last and self.batch.ndim == 4:
                self.batch = self.batch.contiguous(memory_format=torch.channels_last)
            self.names.append(ACTIVATION_NORM)

    @torch.no_grad()
    def measure(self) -> torch.Tensor:
        """The norms in ``names`` order, float64 on the model's device; no host sync."""
        per_tensor = torch.stack(torch._foreach_norm(self.params)).double()
        groups = per_tensor.new_zeros(self.num_groups).index_add_(0, self.index, per_tensor**2)
        parts = [groups.sqrt(), groups.sum().sqrt().reshape(1)]
        if self.head_params:
            head = torch.stack(torch._foreach_norm(self.head_params)).double()
            parts.append(head.square().sum().sqrt().reshape(1))
        if self.batch is not None:
            parts.append(self._activation_norm().reshape(1))
        return torch.cat(parts)

    def _activation_norm(self) -> torch.Tensor:
        """Mean L2 norm of the classifier's input, eval mode and fp32, one forward pass.

        Eval mode leaves BatchNorm's running statistics alone and dropout off, and the pass
        draws no random numbers, so measuring does not change the trajectory.
        """
        assert self.classifier is not None and self.batch is not None
        captured: list[torch.Tensor] = []
        hook = self.classifier.register_forward_pre_hook(
            lambda _module, inputs: captured.append(inputs[0])
        )
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(self.batch)
        finally:
            hook.remove()
            self.model.train(was_training)
        features = torch.flatten(captured[0].float(), 1)
        return features.norm(dim=1).double().mean()
