"""metatransfer: Meta-Transfer Learning (Sun et al., CVPR 2019) for few-shot image classification."""

__version__ = "0.1.0"

from metatransfer.predict import FewShotLearner, load

__all__ = ["FewShotLearner", "__version__", "load"]
