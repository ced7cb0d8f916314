"""What every baseline training target offers over its ``named()`` parameters (name -> trainable tensor): iteration
for the optimizer, the count, and the detached state a checkpoint saves."""

from __future__ import annotations

import torch


class NamedParameters:
    """Mixin: ``parameters``, ``num_parameters`` and ``state_dict`` from the subclass's ``named()``."""

    def named(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def parameters(self):
        return iter(self.named().values())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.named().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named().items()}
