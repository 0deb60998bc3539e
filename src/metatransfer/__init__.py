"""metatransfer: Meta-Transfer Learning (Sun et al., CVPR 2019) for few-shot image classification.

    learner = metatransfer.load("omniglot-5shot")   # a shipped model (`mtl models`), a .mtl file or a run
    learner.fit(support_images, support_labels).predict(query_images)

`load` and `FewShotLearner` are imported on first use (PEP 562), so `import metatransfer` and the
`mtl` command's start-up do not import torch. The errors a caller may catch are all `UserError`s;
those about a bad argument are also `ValueError` (`InputError`, `NotFittedError`, `UnknownModelError`)
or `TypeError` (`InputTypeError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metatransfer.errors import (
    ChecksumError,
    ConfigError,
    DataError,
    FileError,
    InputError,
    InputTypeError,
    ModelFileError,
    NotFittedError,
    TrainingError,
    UnknownModelError,
    UserError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from metatransfer.predict import FewShotLearner, load

__all__ = [
    "ChecksumError",
    "ConfigError",
    "DataError",
    "FewShotLearner",
    "FileError",
    "InputError",
    "InputTypeError",
    "ModelFileError",
    "NotFittedError",
    "TrainingError",
    "UnknownModelError",
    "UserError",
    "__version__",
    "load",
]


def __getattr__(name: str) -> Any:
    if name in ("FewShotLearner", "load"):
        from metatransfer import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'metatransfer' has no attribute {name!r}")
