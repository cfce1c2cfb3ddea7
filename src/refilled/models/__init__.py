"""Model zoo: WRN-depth-width and MobileNet-v1, ours and the authors' (refilled.models.archs names
them), all returning :class:`ModelOutput`.

The names below are loaded on first use (PEP 562), so that the architecture names
(refilled.models.archs: the profile checks, the Snakefile) import no torch.
"""

from refilled import lazy_names

_WHERE = {
    **dict.fromkeys(("AUTHORS_ARCHS", "KNOWN_ARCHS", "parse_arch"), "refilled.models.archs"),
    **dict.fromkeys(("AuthorsMobileNet", "AuthorsWideResNet"), "refilled.models.authors"),
    "MobileNetV1": "refilled.models.mobilenet",
    **dict.fromkeys(("ModelOutput", "WideResNet"), "refilled.models.wrn"),
    "build_model": "refilled.models.build",
}

__all__ = ["AUTHORS_ARCHS", "KNOWN_ARCHS", "AuthorsMobileNet", "AuthorsWideResNet", "ModelOutput", "MobileNetV1",
           "WideResNet", "build_model", "parse_arch"]

__getattr__, __dir__ = lazy_names(__name__, _WHERE)
