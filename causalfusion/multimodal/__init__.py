"""Vision-language CausalFusion (paper Sec. 6, App. C): text-to-image and captioning in one model.

Public API::

    from causalfusion.multimodal import (MultimodalCausalFusion, TextConfig, TextTokenizer, train_bpe,
        MixConfig, multimodal_loss, text_to_image, caption, MMTrainer, MMTrainConfig, load_multimodal,
        load_captioned, make_shapes, detect_objects, parse_caption)

See docs/multimodal.md.
"""
from .data import CaptionDataset, CaptionStream, load_captioned
from .generate import caption, text_to_image
from .model import MultimodalCausalFusion, TextConfig, build_model
from .objective import MixConfig, multimodal_loss, text_loss
from .shapes import detect_objects, make_shapes, parse_caption
from .tokenizer import TextTokenizer, train_bpe
from .train import MMTrainConfig, MMTrainer, load_multimodal

__all__ = [
    "CaptionDataset", "CaptionStream", "MMTrainConfig", "MMTrainer", "MixConfig", "MultimodalCausalFusion",
    "TextConfig", "TextTokenizer", "build_model", "caption", "detect_objects", "load_captioned", "load_multimodal",
    "make_shapes", "multimodal_loss", "parse_caption", "text_loss", "text_to_image", "train_bpe",
]
