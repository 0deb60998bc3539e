"""metatransfer: Meta-Transfer Learning (Sun et al., CVPR 2019) for few-shot image classification.

`load` and `FewShotLearner` are imported on first use (PEP 562), so `import metatransfer` and the
`mtl` command's start-up do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from metatransfer.predict import FewShotLearner, load

__all__ = ["FewShotLearner", "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name in ("FewShotLearner", "load"):
        from metatransfer import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'metatransfer' has no attribute {name!r}")
